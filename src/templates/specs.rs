//! What templates promise, rendered end to end (document, escaping, dialect, shape) without the server.

use super::context::CtxObject;
use super::render::{self, RenderLimits};
use super::{Draft, Render, Template, TemplateKind};
use serde_json::{Value, json};

fn template(text: &str) -> Template {
    Template::compile(&render::parser().unwrap(), "clevertap", "t", "templates/clevertap/t.liquid", text)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The variables of a test, read in place as a source's are (leaked: a test's values live as long as the test).
fn ctx(v: Value) -> CtxObject<'static> {
    let v: &'static Value = Box::leak(Box::new(v));
    CtxObject::from_json(v.as_object().unwrap(), super::context::Dates::AsSent)
}

/// The one track body a template renders to.
fn track(text: &str, data: Value) -> Value {
    let drafts = template(text).render(&ctx(data), &RenderLimits::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(drafts.len(), 1, "{drafts:?}");
    Value::Object(drafts.into_iter().next().map(|d: Draft| d.body).unwrap())
}

fn text_of(expr: &str, data: Value) -> Value {
    track(&format!("{{\"event\": \"E\", \"v\": \"{expr}\"}}"), data)["v"].clone()
}

#[test]
fn clevertap_payload_text_with_double_quotes_inside_a_tag_loads_and_renders() {
    // As CleverTap's partner guides write it: double quotes inside a Liquid tag inside a JSON string.
    let t = "{\n  \"event\": \"Purchase\",\n  \"identity\": \"{{ Profile.Email | default: \"test@gmail.com\" }}\"\n}";
    let tpl = template(t);
    assert_eq!(tpl.kind, TemplateKind::Text);
    assert_eq!(track(t, json!({"Profile": {"Email": "a@b.co"}}))["identity"], "a@b.co");
    assert_eq!(track(t, json!({"Profile": {}}))["identity"], "test@gmail.com");
}

#[test]
fn unquoted_outputs_are_json_values_and_loops_can_build_arrays() {
    let t = r#"{"event": "Charged", "properties": {"total": {{ Event.Amount }}, "names": [{% for i in Event.Items %}"{{ i.name }}"{% unless forloop.last %},{% endunless %}{% endfor %}], "first": {{ Event.Items | first | json }} }}"#;
    let body = track(t, json!({"Event": {"Amount": 12.5, "Items": [{"name": "a\"b"}, {"name": "c"}]}}));
    assert_eq!(body["properties"]["total"], json!(12.5));
    assert_eq!(body["properties"]["names"], json!(["a\"b", "c"]));
    let body =
        track(r#"{"event": "E", "properties": {"total": {{ Event.Amount }}, "s": {{ Event.Name }}}}"#, json!({}));
    assert_eq!(body["properties"], json!({}), "nil outside a string is null, and null fields are left out");
}

#[test]
fn hostile_values_stay_inside_their_fields_in_text_templates() {
    let t = r#"{"app_id": "111", "event": "E", "identity": "u", "properties": {"a": "x{{ v }}y", "b": {{ v }}, "c": "{{ v }}", "d": "{{ v | upcase }}"}}"#;
    for hostile in [
        "\",\"app_id\":\"1",
        "\\\",\\\"app_id\\\":\\\"1",
        "line\nbreak\r\t\u{1}",
        "{{ Profile.secret }}{% abort %}",
        "\\",
        "\"}, \"app_id\": \"2\", \"x\": {\"",
    ] {
        let body = track(t, json!({"v": hostile, "Profile": {"secret": "s"}}));
        assert_eq!(body["app_id"], "111", "{hostile:?}");
        let p = body["properties"].as_object().unwrap();
        assert_eq!(p.len(), 4, "{hostile:?}: {p:?}");
        assert_eq!(p["a"], json!(format!("x{hostile}y")));
        assert_eq!(p["b"], json!(hostile));
        assert_eq!(p["c"], json!(hostile));
        assert_eq!(p["d"], json!(hostile.to_uppercase()));
    }
}

#[test]
fn a_string_that_is_one_output_keeps_its_json_type_in_both_kinds() {
    let data = json!({"n": 42, "f": 1.5, "b": true, "o": {"a": [1, "x"]}, "s": "42"});
    for t in [
        r#"{"event": "E", "n": "{{ n }}", "f": "{{ f }}", "b": "{{ b }}", "o": "{{ o }}", "s": "{{ s }}", "m": "n={{ n }}"}"#,
        r#"{"event": "E", "n": "{{ n }}", "f": "{{ f }}", "b": "{{ b }}", "o": "{{ o }}", "s": "{{ s }}", "m": "n={{ n }}", "x": {{ n }}}"#,
    ] {
        let body = track(t, data.clone());
        assert_eq!(body["n"], json!(42));
        assert_eq!(body["f"], json!(1.5));
        assert_eq!(body["b"], json!(true));
        assert_eq!(body["o"], json!({"a": [1, "x"]}));
        assert_eq!(body["s"], json!("42"), "a string that looks like a number stays a string");
        assert_eq!(body["m"], json!("n=42"));
    }
}

#[test]
fn assign_and_capture_carry_across_the_leaves_of_a_json_template_in_document_order() {
    let t = r#"{"event": "{% assign tier = Profile.points | plus: 0 | at_least: 100 %}{% capture who %}{{ Profile.Name }} <{{ Profile.Email }}>{% endcapture %}E", "identity": "u", "properties": {"tier": "{{ tier }}", "who": "{{ who }}"}}"#;
    let body = track(t, json!({"Profile": {"points": 250, "Name": "Jane \"J\"", "Email": "j@x.co"}}));
    assert_eq!(body["properties"]["tier"], json!(250));
    assert_eq!(body["properties"]["who"], json!("Jane \"J\" <j@x.co>"));
}

#[test]
fn nil_is_forgiven_as_shopify_does() {
    let empty = json!({"Profile": {}});
    assert_eq!(text_of("{{ Profile.points | plus: 200 }}", empty.clone()), json!(200));
    assert_eq!(text_of("{{ 5000 | minus: Profile.credit_points }}", empty.clone()), json!(5000));
    assert_eq!(text_of("[{{ Profile.tags | join: ',' }}]", empty.clone()), json!("[]"));
    assert_eq!(text_of("{{ Profile.tags | first | default: 'none' }}", empty.clone()), json!("none"));
    assert_eq!(text_of("{{ Profile.tags | last | default: 'none' }}", empty.clone()), json!("none"));
    assert_eq!(text_of("{{ Profile.items | map: 'name' | size }}", empty.clone()), json!(0));
    assert_eq!(
        text_of("{{ Profile.x | abs }}|{{ Profile.x | round }}|{{ Profile.x | times: 3 }}", empty.clone()),
        json!("0|0|0")
    );
    assert_eq!(text_of("{% if Profile.tags contains 'vip' %}y{% else %}n{% endif %}", empty.clone()), json!("n"));
    assert_eq!(text_of("{% if Profile.opted_out == false %}y{% else %}n{% endif %}", empty.clone()), json!("n"));
    assert_eq!(text_of("{% if Profile.opted_out == nil %}y{% else %}n{% endif %}", empty.clone()), json!("y"));
    assert_eq!(text_of("{% if Profile.opted_out != false %}y{% else %}n{% endif %}", empty.clone()), json!("y"));
    assert_eq!(text_of("{% if Profile.age > 18 %}y{% else %}n{% endif %}", empty), json!("n"));
    assert_eq!(text_of("{% if f == false %}y{% else %}n{% endif %}", json!({"f": false})), json!("y"));
    assert_eq!(
        text_of(
            "{{ '7' | plus: 1 }}|{{ 'abc' | plus: 1 }}|{{ 7 | divided_by: 2 }}|{{ 7.0 | divided_by: 2 }}",
            json!({})
        ),
        json!("8|1|3|3.5")
    );
}

#[test]
fn default_works_on_missing_keys_at_any_depth_and_bare() {
    let data = json!({"Profile": {"Name": "Jane"}});
    assert_eq!(text_of("{{ Profile.Email | default: 'user@example.com' }}", data.clone()), json!("user@example.com"));
    assert_eq!(text_of("{{ Profile.address.city | default: 'x' }}", data.clone()), json!("x"));
    assert_eq!(text_of("{{ Nope.deep.er | default: 'y' }}", data.clone()), json!("y"));
    assert_eq!(text_of("{{ Profile.Email | default }}", data.clone()), Value::Null);
    assert_eq!(text_of("a{{ Profile.Email | default }}b", data), json!("ab"));
}

#[test]
fn clevertap_dialect_names_filters_and_abort() {
    let data = json!({"Profile": {"city": "Pune", "customer type": "gold"}, "Event": {"NPS Score": 9}, "Campaign": {"campaignId": 17}});
    assert_eq!(text_of("{{ @Profile.city }}", data.clone()), json!("Pune"));
    assert_eq!(text_of("{{ Event.NPS Score }}", data.clone()), json!(9));
    assert_eq!(text_of("{{ Profile['customer type'] }}", data.clone()), json!("gold"));
    assert_eq!(text_of("{{ Profile.customer type | upcase }}", data.clone()), json!("GOLD"));
    let promoter = "{% if Event.NPS Score > 8 and Profile.customer type == 'gold' %}promoter{% else %}other{% endif %}";
    assert_eq!(text_of(promoter, data.clone()), json!("promoter"));
    assert_eq!(text_of("{% assign s = Event.NPS Score | plus: 1 %}{{ s }}", data.clone()), json!(10));
    assert_eq!(text_of("{{ 'hELLO wORLD' | capitalize }}", json!({})), json!("Hello world"));
    assert_eq!(text_of("{{ 'a b&c/d?e=f' | url_escape }}", json!({})), json!("a%20b&c/d?e=f"));
    assert_eq!(text_of("{{ 'a b&c/d?e=f' | url_param_escape }}", json!({})), json!("a%20b%26c/d?e=f"));
    let t = template(r#"{"event": "E", "identity": "{% if Profile.city == 'Pune' %}{% abort %}{% endif %}u"}"#);
    assert_eq!(t.render_item(&ctx(data), &RenderLimits::default()).unwrap(), Render::Aborted);
}

#[test]
fn date_reads_clevertap_iso_and_epoch_dates_and_prints_clevertaps_default_format() {
    let data = json!({"d": "2024-11-18T18:55:00Z", "s": 1731956100, "ms": 1731956100000i64, "ct": "$D_1731956100", "x": "soon"});
    assert_eq!(text_of("{{ d | date: '%Y-%m-%d' }}", data.clone()), json!("2024-11-18"));
    assert_eq!(text_of("{{ d | date }}", data.clone()), json!("2024-11-18 18:55:00"));
    assert_eq!(
        text_of("{{ s | date }}|{{ ms | date }}|{{ ct | date }}", data.clone()),
        json!("2024-11-18 18:55:00|2024-11-18 18:55:00|2024-11-18 18:55:00")
    );
    assert_eq!(text_of("{{ x | date: '%Y' }}", data), json!("soon"), "not a date: unchanged");
    let year = text_of("{{ 'now' | date: '%Y' }}", json!({}));
    assert!(year.as_str().unwrap().starts_with("20"), "{year}");
}

#[test]
fn sections_render_only_when_their_condition_holds_in_a_text_template() {
    let t = r#"{"track": {"when": {% if type == 'track' %}true{% else %}false{% endif %}, "event": "E", "identity": "u"},
               "add_user_properties": {"when": "{% if type == 'identify' %}yes{% endif %}", "identity": "u", "properties": {"a": 1}}}"#;
    let drafts = template(t).render(&ctx(json!({"type": "identify"})), &RenderLimits::default()).unwrap();
    assert_eq!(drafts.len(), 1);
    assert_eq!(drafts[0].kind, crate::domain::CallKind::UserProperties);
}

#[test]
fn output_that_is_not_json_is_refused_naming_line_column_and_the_text_around_it() {
    let t = "{\n  \"event\": \"E\",\n  \"n\": {{ n }} {{ n }}\n}";
    let err = template(t).render(&ctx(json!({"n": 1})), &RenderLimits::default()).unwrap_err();
    let m = err.to_string();
    assert!(m.contains("templates/clevertap/t.liquid"), "{m}");
    assert!(m.contains("after the output at line 3 column 16"), "{m}");
    assert!(m.contains("not valid JSON") && m.contains("1 ⟨here⟩1"), "{m}");
}

#[test]
fn loop_variables_missing_keys_render_as_nothing_not_an_error() {
    let data = json!({"items": [{"a": 1}, {"b": 2}]});
    assert_eq!(text_of("{% for i in items %}{{ i.a }}{% endfor %}", data.clone()), json!("1"));
    assert_eq!(text_of("{{ items[1].a | default: 'd' }}", data), json!("d"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    #[test]
    fn no_value_can_end_a_string_add_a_field_or_change_app_id(v in ".{0,40}", w in "[\"\\\\{}\\[\\],:a-z\n ]{0,20}") {
        let t = r#"{"app_id": "111", "event": "E {{ v }}", "identity": "{{ w }}", "properties": {"a": {{ v }}, "b": "<{{ w | append: v }}>", "c": [{{ w }}, "{{ v }}"]}}"#;
        let body = track(t, json!({"v": v, "w": w}));
        proptest::prop_assert_eq!(&body["app_id"], "111");
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        proptest::prop_assert!(keys.iter().all(|k| ["app_id", "event", "identity", "properties"].contains(&k.as_str())), "{:?}", keys);
        proptest::prop_assert_eq!(&body["event"], &json!(format!("E {v}")));
        let p = body["properties"].as_object().unwrap();
        proptest::prop_assert!(p.keys().all(|k| ["a", "b", "c"].contains(&k.as_str())), "{:?}", p);
        proptest::prop_assert_eq!(&p["b"], &json!(format!("<{w}{v}>")));
    }
}

// ---- the direct plan renders what liquid renders -----------------------------------------------------------------

/// JSON templates in the plan's subset: the shipped ones and the idioms around them.
const PLAN_TEMPLATES: &[&str] = &[
    include_str!("../../templates/clevertap/default.json"),
    include_str!("../../templates/clevertap/heap_recipe.json"),
    include_str!("../../templates/segment/default.json"),
    include_str!("../../templates/userpilot/default.json"),
    include_str!("../../templates/userpilot/with_user_properties.json"),
    r#"{"event": "E {{ a }}-{{ b.c | default: a }}", "identity": "{{ a | default: b.c | default: 'anon' }}",
        "properties": {"n": "{{ n | default: 0 }}", "x": "{{ b['c d'] }}", "y": "[{{ b }}]", "z": "{{ b | default }}",
                       "list": ["{{ a }}", "k", 3, null, "{{ n }}"], "...b": "{{ b }}"}}"#,
    r#"{"track": {"when": "{% unless a == b.c %}yes{% endunless %}", "event": "{% if a %}A{% elsif n == 1 %}one{% elsif b.c != 'x' and n %}bc{% else %}none{% endif %}",
                  "identity": "{% if a or b.c and n %}{{ a }}{% endif %}u"},
        "add_user_properties": {"when": "{% if n != nil %}{{ n }}{% endif %}", "identity": "{{ b.c }}", "properties": {"a": "{{ a }}"}}}"#,
    // Text templates: Liquid inside strings and standing for whole values.
    include_str!("../../templates/clevertap/default_text.liquid"),
    r#"{% comment %} a "quoted" note {% endcomment %}
       {"event": "  {{ a }}  ", "identity": "{{ b.c | default: 'u' }}", "_c": "{{ a }}",
        "properties": {"n": {{ n }}, "t": "x\"{{ a }}\n{% if n %}{{ n }}{% endif %}", "b": {{ b | default: a }},
                       "one": "{% if n %}{{ n }}{% endif %}", "list": [{{ a }}, "{{ n }}{{ a }}"], "...b": {{ b }}}}"#,
];

fn arb_scalar() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just(0.1f64), Just(-0.0), Just(129.99), Just(1e300), Just(6.55), any::<f64>()]
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just(String::new()),
            Just(" ".to_owned()),
            Just("x".to_owned()),
            Just("track".to_owned()),
            Just("identify".to_owned()),
            Just("false".to_owned()),
            Just("\",\"app_id\":\"1".to_owned()),
            Just("{{ a }}{% abort %}".to_owned()),
            "\\PC{0,12}",
        ]
        .prop_map(Value::String),
    ]
}

fn arb_value() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    arb_scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("c".to_owned()),
                    Just("C".to_owned()),
                    Just("c d".to_owned()),
                    Just("size".to_owned()),
                    Just("x".to_owned()),
                    Just("Identity".to_owned()),
                    Just("email".to_owned()),
                    Just("id".to_owned()),
                    Just("heap_event".to_owned()),
                    Just("value".to_owned())
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Variables named as the templates above read them (and in other casings), holding anything.
fn arb_globals() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let names = prop_oneof![
        Just("a"),
        Just("b"),
        Just("n"),
        Just("type"),
        Just("Profile"),
        Just("profile"),
        Just("Event"),
        Just("KeyValues"),
        Just("Campaign"),
        Just("user_id"),
        Just("heap_event"),
        Just("heap_traits"),
        Just("heap_properties"),
        Just("identity"),
        Just("metadata"),
        Just("user_properties"),
        Just("timestamp"),
        Just("messageId"),
    ];
    proptest::collection::btree_map(names.prop_map(str::to_owned), arb_value(), 0..10)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

#[test]
fn every_plan_template_compiles_to_a_plan_and_the_plan_renders_plain_variables_itself() {
    let plain = ctx(json!({"a": "x", "b": {"c": 1}, "n": 2, "type": "track", "identity": "u",
                           "Profile": {"Email": "e@x.co"}, "user_id": "u", "heap_event": "E"}));
    for text in PLAN_TEMPLATES {
        let t = template(text);
        assert!(t.has_plan(), "no plan for {text}");
        assert!(t.plan_renders(&plain, &RenderLimits::default()), "the plan gave {text} back to liquid");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
    #[test]
    fn a_plan_renders_what_liquid_renders(which in 0..PLAN_TEMPLATES.len(), globals in arb_globals()) {
        let t = template(PLAN_TEMPLATES[which]);
        let c = ctx(globals);
        let limits = RenderLimits::default();
        let planned = t.render_item(&c, &limits).map_err(|e| e.to_string());
        let liquid = t.render_item_with_liquid(&c, &limits).map_err(|e| e.to_string());
        proptest::prop_assert_eq!(planned, liquid);
    }
}
