//! Heap rate budgets shared by every instance on one database: token buckets in `rate_budget`, taken under row locks
//! in one transaction per claimed round, so several instances together keep to one budget.

use super::{PgStore, pg_err};
use crate::delivery::rate_limit::{SharedBucket, take_shared};
use crate::store::{Millis, StoreError};
use std::collections::HashMap;
use std::time::Duration;

impl PgStore {
    /// What the shared app budgets hold at `now` (read, not taken), in whole events: a claim takes no more of an
    /// app_id than that and skips an app_id that holds less than one, so a backlog held back by the app budget is
    /// neither claimed nor released row by row. App_ids with no bucket yet are not listed (their bucket is full).
    pub async fn app_allowances(&self, app_per_min: u32, now: Millis) -> Result<Vec<(String, i64)>, StoreError> {
        if app_per_min == 0 {
            return Ok(Vec::new());
        }
        let client = self.pool.get().await?;
        let rows = client
            .query(&client.prepare_cached("SELECT app_id, tokens, at FROM rate_budget WHERE identity = ''").await?, &[])
            .await
            .map_err(pg_err)?;
        let rate = app_per_min as f64 / 60_000.0;
        Ok(rows
            .iter()
            .map(|r| {
                let (tokens, at): (f64, i64) = (r.get(1), r.get(2));
                let now_holds = (tokens + (now - at).max(0) as f64 * rate).min(app_per_min as f64);
                (r.get(0), now_holds.floor() as i64)
            })
            .collect())
    }

    /// Takes one event's worth from the shared budgets of each `(app_id, identity)` in `wants`, in order, and says
    /// for each whether it may go now (`None`) or how long until it may. Every instance on this database takes from
    /// the same rows, under row locks, so together they keep to one budget. A rate of 0 turns that budget off.
    ///
    /// One transaction (`take_once`): lock the buckets that exist, in key order; take from them, and from full
    /// buckets for the keys that have none yet; write the existing ones back and insert the new ones, in key order,
    /// with what is left in them. A new identity (most of them, in a campaign) so costs one row insert, not an
    /// insert, a lock and an update. Every taker locks before it inserts, each in key order, so takers never
    /// deadlock. If another instance created one of the new buckets meanwhile, the transaction is rolled back and
    /// taken again, now with that bucket locked: exact either way.
    pub async fn take_budget(
        &self,
        wants: &[(&str, &str)],
        app_per_min: u32,
        identity_per_min: u32,
        now: Millis,
    ) -> Result<Vec<Option<Duration>>, StoreError> {
        let keys = bucket_keys(wants, app_per_min, identity_per_min);
        if keys.is_empty() {
            return Ok(vec![None; wants.len()]);
        }
        let mut client = self.pool.get().await?;
        for _ in 0..TAKE_ATTEMPTS {
            if let Some(verdicts) = take_once(&mut client, wants, &keys, app_per_min, identity_per_min, now).await? {
                return Ok(verdicts);
            }
        }
        // Each attempt found a bucket created under it by another instance: the round fails and is tried again.
        Err(StoreError::Io(std::io::Error::other(format!(
            "rate budget buckets were created by other instances under {TAKE_ATTEMPTS} takes in a row"
        ))))
    }
}

/// Takes a round may make before it gives up (each retry follows another instance creating a bucket it wanted).
const TAKE_ATTEMPTS: usize = 8;

/// One attempt of `PgStore::take_budget`; `None` when a bucket it meant to create was created by another instance
/// under it (the transaction is rolled back, nothing taken).
async fn take_once(
    client: &mut deadpool_postgres::Client,
    wants: &[(&str, &str)],
    keys: &[(&str, &str)],
    app_per_min: u32,
    identity_per_min: u32,
    now: Millis,
) -> Result<Option<Vec<Option<Duration>>>, StoreError> {
    let (apps, whos): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    let tx = client.transaction().await?;
    let mut buckets = locked_buckets(&tx, &apps, &whos).await?;
    let existing: std::collections::HashSet<(String, String)> = buckets.keys().cloned().collect();
    let verdicts = take_shared(&mut buckets, wants, app_per_min, identity_per_min, now);
    let (old, new): (Vec<_>, Vec<_>) = sorted(buckets).into_iter().partition(|(k, _)| existing.contains(k));
    if !new.is_empty() {
        let wanted = new.len() as u64;
        let (a, i, t, at) = columns(new);
        let inserted = tx
            .execute(
                &tx.prepare_cached(
                    "INSERT INTO rate_budget (app_id, identity, tokens, at)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::int8[]) AS k(a, i, t, at)
                     ORDER BY a, i
                     ON CONFLICT DO NOTHING",
                )
                .await?,
                &[&a, &i, &t, &at],
            )
            .await
            .map_err(pg_err)?;
        if inserted < wanted {
            tx.rollback().await.map_err(pg_err)?;
            return Ok(None);
        }
    }
    write_back(&tx, old).await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(Some(verdicts))
}

/// The buckets `wants` takes from, sorted and without repeats: `(app_id, "")` for the app budget, `(app_id,
/// identity)` for the identity budget, each only when its rate is on.
fn bucket_keys<'a>(wants: &[(&'a str, &'a str)], app_per_min: u32, identity_per_min: u32) -> Vec<(&'a str, &'a str)> {
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for &(app, who) in wants {
        if app_per_min > 0 {
            keys.push((app, ""));
        }
        if identity_per_min > 0 {
            keys.push((app, who));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

type Buckets = HashMap<(String, String), SharedBucket>;

/// The existing buckets among `(apps[k], whos[k])`, locked in key order.
async fn locked_buckets(
    tx: &deadpool_postgres::Transaction<'_>,
    apps: &[&str],
    whos: &[&str],
) -> Result<Buckets, StoreError> {
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT b.app_id, b.identity, b.tokens, b.at FROM rate_budget b
                 JOIN unnest($1::text[], $2::text[]) AS k(a, i) ON b.app_id = k.a AND b.identity = k.i
                 ORDER BY b.app_id, b.identity
                 FOR UPDATE OF b",
            )
            .await?,
            &[&apps, &whos],
        )
        .await
        .map_err(pg_err)?;
    Ok(rows.iter().map(|r| ((r.get(0), r.get(1)), SharedBucket { tokens: r.get(2), at: r.get(3) })).collect())
}

fn sorted(buckets: Buckets) -> Vec<((String, String), SharedBucket)> {
    let mut sorted: Vec<_> = buckets.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
}

fn columns(buckets: Vec<((String, String), SharedBucket)>) -> (Vec<String>, Vec<String>, Vec<f64>, Vec<i64>) {
    let (mut a, mut i, mut t, mut at) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((app, who), b) in buckets {
        a.push(app);
        i.push(who);
        t.push(b.tokens);
        at.push(b.at);
    }
    (a, i, t, at)
}

/// Writes locked buckets back.
async fn write_back(
    tx: &deadpool_postgres::Transaction<'_>,
    buckets: Vec<((String, String), SharedBucket)>,
) -> Result<(), StoreError> {
    if buckets.is_empty() {
        return Ok(());
    }
    let (a, i, t, at) = columns(buckets);
    tx.execute(
        &tx.prepare_cached(
            "UPDATE rate_budget b SET tokens = k.t, at = k.at
             FROM unnest($1::text[], $2::text[], $3::float8[], $4::int8[]) AS k(a, i, t, at)
             WHERE b.app_id = k.a AND b.identity = k.i",
        )
        .await?,
        &[&a, &i, &t, &at],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}
