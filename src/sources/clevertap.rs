//! CleverTap webhooks: the default body (`targetId`, `key_values`, `profiles`) in both key casings, with
//! `profiles` as an array (broadcast) or one object (non-broadcast), and the creation ping (`"is_test": true`).
//!
//! Template variables mirror CleverTap's own Liquid: `Profile.<key>` (Email, Identity, Name, Phone, ObjectId and
//! every profileData key as sent, spaces included), `Event.<key>` (event_properties), `Campaign.id` and `Campaign.campaignId` (targetId),
//! `KeyValues.<key>` (campaign key_values), and `body` (the raw profile). `$D_<epoch seconds>` dates become ISO-8601.

use super::{Item, Shape, SourceOptions, get_ci};
use crate::domain::timestamp::from_epoch;
use crate::domain::{FieldError, Seed};
use crate::templates::context::{Ctx, CtxObject, Dates, Over};
use chrono::SecondsFormat;
use serde_json::{Map, Value};

/// Top-level profile fields CleverTap sends, with the names its Liquid uses for them.
const PROFILE_FIELDS: &[(&str, &str)] = &[
    ("email", "Email"),
    ("identity", "Identity"),
    ("name", "Name"),
    ("phone", "Phone"),
    ("objectId", "ObjectId"),
    ("all_identities", "All_identities"),
    ("push_token", "Push_token"),
];

/// Builds each profile's item and hands it to `f`; `options.raw_body` off leaves `body` out of the variables.
pub fn for_each<'a>(
    body: &'a Value,
    options: &SourceOptions,
    f: &mut dyn FnMut(Result<Item<'a>, FieldError>),
) -> Result<Shape, FieldError> {
    let Value::Object(root) = body else {
        return Err(FieldError::invalid("body", "a CleverTap webhook body must be a JSON object with `profiles`"));
    };
    if get_ci(root, "is_test").is_some_and(is_true) {
        return Ok(Shape::Ping);
    }
    let profiles: Vec<&Value> = match get_ci(root, "profiles") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(obj @ Value::Object(_)) => vec![obj],
        Some(_) => {
            return Err(FieldError::invalid("profiles", "profiles must be an array or an object"));
        }
        None => {
            f(Ok(custom_item(body, root)));
            return Ok(Shape::Items);
        }
    };
    let target_id = get_ci(root, "targetId").unwrap_or(&Value::Null);
    let campaign_kv = get_ci(root, "key_values").unwrap_or(&Value::Null);
    for (i, p) in profiles.into_iter().enumerate() {
        f(profile_item(p, target_id, campaign_kv, options.raw_body).map_err(|e| e.under(&format!("profiles[{i}]"))));
    }
    Ok(Shape::Items)
}

/// A profile's variables, read in place: building them copies no value, and the campaign's `targetId` and
/// `key_values` are shared by every profile, not copied into each.
fn profile_item<'a>(
    profile: &'a Value,
    target_id: &'a Value,
    campaign_kv: &'a Value,
    raw_body: bool,
) -> Result<Item<'a>, FieldError> {
    const CT: Dates = Dates::CleverTap;
    let Value::Object(p) = profile else {
        return Err(FieldError::invalid("", "each profile must be a JSON object"));
    };
    let mut prof = match get_ci(p, "profileData") {
        Some(Value::Object(data)) => CtxObject::from_json(data, CT),
        _ => CtxObject::new(),
    };
    // Under CleverTap's Liquid names; a template's `Profile.email` finds `Email` too (lookups fall back to any
    // casing), so the names as sent need no entries of their own.
    for (sent, canonical) in PROFILE_FIELDS {
        if let Some(v) = get_ci(p, sent) {
            prof.insert(*canonical, Ctx::json(v, CT));
        }
    }
    // systemProfileData under them, where no key of the same name (in any casing) is there already.
    let prof = match get_ci(p, "systemProfileData") {
        Some(Value::Object(sys)) => Ctx::Over(Box::new(Over::new(prof, sys, CT))),
        _ => Ctx::Object(prof),
    };
    let event = match get_ci(p, "event_properties") {
        Some(e @ Value::Object(_)) => Ctx::json(e, CT),
        _ => Ctx::Object(CtxObject::new()),
    };
    let kv = match get_ci(p, "key_values") {
        Some(v @ Value::Object(_)) => v,
        _ => campaign_kv,
    };
    let mut campaign = CtxObject::new();
    campaign.insert("id", Ctx::json(target_id, Dates::AsSent));
    // CleverTap's own Liquid name for the campaign id.
    campaign.insert("campaignId", Ctx::json(target_id, Dates::AsSent));
    let mut ctx = CtxObject::new();
    ctx.insert("Profile", prof);
    ctx.insert("Event", event);
    ctx.insert("Campaign", Ctx::Object(campaign));
    ctx.insert(
        "KeyValues",
        match kv {
            Value::Object(_) => Ctx::json(kv, Dates::AsSent),
            _ => Ctx::Object(CtxObject::new()),
        },
    );
    if raw_body {
        ctx.insert("body", Ctx::json(profile, CT));
    }
    ctx.insert("targetId", Ctx::json(target_id, Dates::AsSent));
    Ok(Item { ctx, seed: Seed::Fields([("profile", profile), ("targetId", target_id)]), excluded: false })
}

fn custom_item<'a>(body: &'a Value, root: &'a Map<String, Value>) -> Item<'a> {
    const CT: Dates = Dates::CleverTap;
    let mut ctx = CtxObject::from_json(root, CT);
    ctx.insert("body", Ctx::json(body, CT));
    ctx.insert_missing("Profile", Ctx::json(body, CT));
    let nested = |key: &str| match get_ci(root, key) {
        Some(o @ Value::Object(_)) => Ctx::json(o, CT),
        _ => Ctx::Object(CtxObject::new()),
    };
    ctx.insert_missing("Event", nested("event_properties"));
    ctx.insert_missing("KeyValues", nested("key_values"));
    let target_id = Ctx::json(get_ci(root, "targetId").unwrap_or(&Value::Null), Dates::AsSent);
    let mut campaign = CtxObject::new();
    campaign.insert("id", target_id.clone());
    campaign.insert("campaignId", target_id);
    ctx.insert_missing("Campaign", Ctx::Object(campaign));
    Item { ctx, seed: Seed::Object(root), excluded: false }
}

/// CleverTap sends dates as `$D_<epoch seconds>`; templates and Heap get ISO-8601 UTC.
pub fn ct_date(s: &str) -> Option<String> {
    let secs: f64 = s.strip_prefix("$D_")?.parse().ok()?;
    from_epoch(secs).map(|dt| dt.to_rfc3339_opts(SecondsFormat::Secs, true))
}

fn is_true(v: &Value) -> bool {
    matches!(v, Value::Bool(true)) || matches!(v, Value::String(s) if s.eq_ignore_ascii_case("true"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{Parsed, Source, SourceOptions};
    use serde_json::json;

    fn parse(body: &Value) -> Result<Parsed<'_>, FieldError> {
        crate::sources::parse(Source::CleverTap, body, &SourceOptions::default())
    }

    #[test]
    fn the_seed_is_the_same_text_idempotency_keys_were_derived_from() {
        let profile = json!({"identity": "u_1", "profileData": {"b": 1, "a": [1.5, "x"]}, "Email": "a@b.co"});
        for target in [json!(1732101122), Value::Null, json!("t")] {
            let old = json!({"targetId": target, "profile": profile}).to_string();
            let body = json!({"targetId": target, "profiles": [profile]});
            let Parsed::Items(items) = parse(&body).unwrap() else { panic!("items") };
            assert_eq!(items[0].as_ref().unwrap().seed.text(), old);
        }
    }

    #[test]
    fn dates_convert_and_other_strings_do_not() {
        assert_eq!(ct_date("$D_1731956100").as_deref(), Some("2024-11-18T18:55:00Z"));
        assert_eq!(ct_date("$D_x"), None);
        assert_eq!(ct_date("D_1"), None);
    }

    #[test]
    fn a_single_profile_object_is_one_item_and_the_ping_is_recognised() {
        let body = json!({"targetId": 1, "profiles": {"Identity": "u"}});
        assert!(matches!(parse(&body).unwrap(), Parsed::Items(v) if v.len() == 1));
        assert!(matches!(parse(&json!({"Is_Test": true, "profiles": []})).unwrap(), Parsed::Ping));
        assert_eq!(parse(&json!({"profiles": "x"})).unwrap_err().field, "profiles");
        assert!(
            matches!(parse(&json!({"email": "a@b.co"})).unwrap(), Parsed::Items(v) if v.len() == 1),
            "a custom body"
        );
    }
}
