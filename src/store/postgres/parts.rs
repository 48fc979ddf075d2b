//! Claims by partition: the queue is split into `PARTS` partitions by app_id and identity, and each delivery
//! worker of every instance leases a fair share of them (a row in `claim_parts`: owner, expiry, and a `token`
//! bumped every time the partition changes hands). A worker reads the ready events of its partitions and writes
//! nothing per event to claim them; its results are recorded only while its partition still carries the token it
//! claimed under (fencing), so a worker whose lease expired and was taken over cannot overwrite the new holder's
//! outcome. One identity's events are always in one partition, so they are sent by one worker, in order.
//!
//! Fair shares: every worker writes a heartbeat (`claim_owners`) every third of its lease; a worker holding more
//! than `PARTS / live workers` gives the rest back at its next round, one holding fewer takes free or expired
//! partitions. A worker that dies stops renewing: its partitions are taken over once their lease has expired.

use super::{PgStore, pg_err};
use crate::store::{Millis, StoreError};
use std::collections::{HashMap, HashSet};

/// How many partitions the queue has. A lease token carries the partition in its low bits.
pub const PARTS: i64 = 64;

/// The partition of an event's row, as SQL: the same for every event of one app_id and identity.
pub const PART_OF_ROW: &str = "(hashtext(app_id || ':' || identity) & 63)";

/// Tables of the partition leases. `claim_parts` has one row per partition from the start.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS claim_parts (
    part    INTEGER PRIMARY KEY,
    owner   TEXT,
    token   BIGINT NOT NULL DEFAULT 0,
    expires BIGINT NOT NULL DEFAULT 0
);
INSERT INTO claim_parts (part) SELECT generate_series(0, 63) ON CONFLICT DO NOTHING;
-- A worker counts towards the fair share while its heartbeat's lease lasts.
CREATE TABLE IF NOT EXISTS claim_owners (
    owner   TEXT PRIMARY KEY,
    expires BIGINT NOT NULL
);
";

/// A partition lease as a lease token: the partition's token and the partition.
pub fn lease_token(part: i32, token: i64) -> i64 {
    token * PARTS + i64::from(part)
}

/// The partition and token a lease token names.
pub fn split_lease(lease: i64) -> (i32, i64) {
    ((lease.rem_euclid(PARTS)) as i32, lease.div_euclid(PARTS))
}

/// What one worker holds, as this instance last saw it.
#[derive(Debug, Default)]
pub struct Holding {
    /// Partition → its token.
    parts: HashMap<i32, i64>,
    /// When the heartbeat and the leases were last written.
    maintained_at: Option<Millis>,
    /// Events claimed and not yet recorded, with their partition and when they were claimed: not claimed again by
    /// the same worker for a lease (after that, as a row lease would, they may be: a round whose record failed
    /// leaves them pending).
    pub in_flight: HashMap<i64, (i32, Millis)>,
    /// Events the rate budgets held back (released unattempted), with their partition and until when: not claimed
    /// again by this worker before then. Kept here rather than written to their rows: a budget's hold writes
    /// nothing per event. Forgotten with the partition, or on a restart (the shared budget holds them again).
    pub held: HashMap<i64, (i32, Millis)>,
}

impl PgStore {
    /// The partitions `owner` holds now (partition, token), after its heartbeat, lease renewal and fair-share
    /// adjustment when they are due.
    pub(super) async fn hold_parts(
        &self,
        client: &deadpool_postgres::Client,
        owner: &str,
        now: Millis,
        lease_ms: i64,
    ) -> Result<Vec<(i32, i64)>, StoreError> {
        let (mut parts, due, in_flight_parts) = {
            let mut holdings = self.holdings.lock().unwrap_or_else(|p| p.into_inner());
            let h = holdings.entry(owner.to_owned()).or_default();
            let due = h.parts.is_empty() || h.maintained_at.is_none_or(|at| now - at >= lease_ms / 3);
            h.in_flight.retain(|_, (_, at)| now - *at < lease_ms);
            h.held.retain(|_, (_, until)| *until > now);
            let busy: HashSet<i32> = h.in_flight.values().map(|(p, _)| *p).collect();
            (h.parts.clone(), due, busy)
        };
        if due {
            client
                .execute(
                    &client
                        .prepare_cached(
                            "INSERT INTO claim_owners (owner, expires) VALUES ($1, $2)
                             ON CONFLICT (owner) DO UPDATE SET expires = excluded.expires",
                        )
                        .await?,
                    &[&owner, &(now + lease_ms)],
                )
                .await
                .map_err(pg_err)?;
            client
                .execute(
                    &client.prepare_cached("DELETE FROM claim_owners WHERE expires < $1").await?,
                    &[&(now - 10 * lease_ms.max(1_000))],
                )
                .await
                .map_err(pg_err)?;
            // Renewed: what is still ours. A partition another worker took is gone from the list.
            let rows = client
                .query(
                    &client
                        .prepare_cached("UPDATE claim_parts SET expires = $2 WHERE owner = $1 RETURNING part, token")
                        .await?,
                    &[&owner, &(now + lease_ms)],
                )
                .await
                .map_err(pg_err)?;
            parts = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
        let others: i64 = client
            .query_one(
                &client.prepare_cached("SELECT count(*) FROM claim_owners WHERE expires >= $1 AND owner <> $2").await?,
                &[&now, &owner],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        let share = (PARTS + others) / (others + 1); // ceil(PARTS / live workers)
        let held = parts.len() as i64;
        if held > share {
            // Give back the surplus, partitions with nothing in flight first.
            let mut mine: Vec<i32> = parts.keys().copied().collect();
            mine.sort_by_key(|p| (in_flight_parts.contains(p), std::cmp::Reverse(*p)));
            let surplus: Vec<i32> = mine.into_iter().take((held - share) as usize).collect();
            client
                .execute(
                    &client
                        .prepare_cached(
                            "UPDATE claim_parts SET owner = NULL, expires = 0 WHERE owner = $1 AND part = ANY($2)",
                        )
                        .await?,
                    &[&owner, &surplus],
                )
                .await
                .map_err(pg_err)?;
            for p in &surplus {
                parts.remove(p);
            }
        } else if held < share {
            let rows = client
                .query(
                    &client
                        .prepare_cached(
                            "UPDATE claim_parts SET owner = $1, token = token + 1, expires = $2
                             WHERE part IN (SELECT part FROM claim_parts
                                            WHERE (owner IS NULL OR expires < $3) AND owner IS DISTINCT FROM $1
                                            ORDER BY part LIMIT $4 FOR UPDATE SKIP LOCKED)
                             RETURNING part, token",
                        )
                        .await?,
                    &[&owner, &(now + lease_ms), &now, &(share - held)],
                )
                .await
                .map_err(pg_err)?;
            parts.extend(rows.iter().map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1))));
        }
        let mut holdings = self.holdings.lock().unwrap_or_else(|p| p.into_inner());
        let h = holdings.entry(owner.to_owned()).or_default();
        // Events of a partition that is no longer ours are the new holder's: forget them here.
        h.in_flight.retain(|_, (p, _)| parts.contains_key(p));
        h.held.retain(|_, (p, _)| parts.contains_key(p));
        h.parts = parts;
        if due {
            h.maintained_at = Some(now);
        }
        Ok(h.parts.iter().map(|(p, t)| (*p, *t)).collect())
    }

    /// Extends `owner`'s leases on the partitions of `leases` (row id, lease token) until `until`; returns how many
    /// of `leases` are still held.
    pub(super) async fn renew_parts(
        &self,
        owner: &str,
        leases: Vec<(i64, i64)>,
        until: Millis,
    ) -> Result<usize, StoreError> {
        let distinct: HashSet<(i32, i64)> = leases.iter().map(|(_, l)| split_lease(*l)).collect();
        let (parts, tokens): (Vec<i32>, Vec<i64>) = distinct.into_iter().unzip();
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "UPDATE claim_parts c SET expires = $4
                         FROM unnest($2::int4[], $3::int8[]) AS l(part, token)
                         WHERE c.part = l.part AND c.token = l.token AND c.owner = $1
                         RETURNING c.part, c.token",
                    )
                    .await?,
                &[&owner, &parts, &tokens, &until],
            )
            .await
            .map_err(pg_err)?;
        let kept: HashSet<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(leases.iter().filter(|(_, l)| kept.contains(&split_lease(*l))).count())
    }

    /// Gives back every partition `owner` holds (shutdown) and its heartbeat; returns how many claimed events it
    /// had not recorded.
    pub(super) async fn release_parts(&self, owner: &str) -> Result<usize, StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                &client.prepare_cached("UPDATE claim_parts SET owner = NULL, expires = 0 WHERE owner = $1").await?,
                &[&owner],
            )
            .await
            .map_err(pg_err)?;
        client
            .execute(&client.prepare_cached("DELETE FROM claim_owners WHERE owner = $1").await?, &[&owner])
            .await
            .map_err(pg_err)?;
        let mut holdings = self.holdings.lock().unwrap_or_else(|p| p.into_inner());
        Ok(holdings.remove(owner).map_or(0, |h| h.in_flight.len()))
    }

    /// Notes claimed events (id, partition) as in flight for `owner` since `now`.
    pub(super) fn claimed(&self, owner: &str, now: Millis, events: impl Iterator<Item = (i64, i32)>) {
        let mut holdings = self.holdings.lock().unwrap_or_else(|p| p.into_inner());
        let h = holdings.entry(owner.to_owned()).or_default();
        h.in_flight.extend(events.map(|(id, part)| (id, (part, now))));
    }

    /// Events `owner` does not claim now: those it claimed and has not recorded, and those the budgets hold back.
    pub(super) fn in_flight(&self, owner: &str) -> Vec<i64> {
        let holdings = self.holdings.lock().unwrap_or_else(|p| p.into_inner());
        holdings.get(owner).map(|h| h.in_flight.keys().chain(h.held.keys()).copied().collect()).unwrap_or_default()
    }

    /// Events released unattempted (the budgets held them back) until `until`: out of flight, and not claimed by
    /// their worker before then. Returns how many were in flight.
    pub(super) fn hold_back(&self, released: &[(i64, Millis)]) -> usize {
        let mut holdings = self.holdings.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for h in holdings.values_mut() {
            for &(id, until) in released {
                if let Some((part, _)) = h.in_flight.remove(&id) {
                    h.held.insert(id, (part, until));
                    n += 1;
                }
            }
        }
        n
    }

    /// Recorded events are no longer in flight for anyone.
    pub(super) fn recorded(&self, ids: &[i64]) {
        let mut holdings = self.holdings.lock().unwrap_or_else(|p| p.into_inner());
        for h in holdings.values_mut() {
            for id in ids {
                h.in_flight.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_token_carries_its_partition_and_token() {
        for (part, token) in [(0, 1), (63, 1), (5, 0), (17, 1 << 40)] {
            assert_eq!(split_lease(lease_token(part, token)), (part, token));
        }
        assert!(lease_token(3, 2) > lease_token(63, 1), "a later token is a larger lease token");
    }
}
