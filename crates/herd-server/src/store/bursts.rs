//! Bursts as billing remembers them: every lease a host reported, from its grant to its
//! end. A host reports its leases whole, so a lease it no longer names has ended (when
//! it was missed, or at its expiry if that came first); a lease whose host never comes
//! back is billed to its expiry, which its host kept whether or not anyone heard.

use super::rows::parse_uuid;
use super::{now_ms, Store, StoreError};
use herd_proto::burst::BurstLease;
use herd_proto::wire::{HostId, VmId};
use rusqlite::params;
use std::collections::HashSet;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bursts (
    vm TEXT NOT NULL,
    granted_at INTEGER NOT NULL,
    host TEXT NOT NULL,
    cpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    ended_at INTEGER,
    PRIMARY KEY (vm, granted_at)
);
CREATE INDEX IF NOT EXISTS bursts_open ON bursts (host) WHERE ended_at IS NULL;
";

/// One lease, as billed: in force from `from_ms` to `to_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurstRow {
    pub cpus: u32,
    pub memory_mib: u64,
    pub from_ms: i64,
    pub to_ms: i64,
}

fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Store {
    /// A host's whole report of its leases: those in force (of VMs placed on it) are
    /// recorded, a renewal moving its expiry; those ended are recorded with their end if
    /// their VM is placed on it (`true`), or else only if the host reported them in
    /// force before; the host's open leases it names in neither list end now, or at
    /// their expiry if that came first.
    pub fn record_bursts(
        &self,
        host: HostId,
        leases: &[(VmId, BurstLease)],
        ended: &[(VmId, BurstLease, u64, bool)],
    ) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let host_text = host.to_string();
        for (vm, lease) in leases {
            tx.prepare_cached(
                "INSERT INTO bursts (vm, granted_at, host, cpus, memory_mib, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (vm, granted_at) DO UPDATE SET \
                 host = ?3, cpus = ?4, memory_mib = ?5, expires_at = ?6, ended_at = NULL",
            )?
            .execute(params![
                vm.to_string(),
                ms(lease.granted_ms),
                host_text,
                lease.cpus,
                ms(lease.memory_mib),
                ms(lease.expires_ms)
            ])?;
        }
        for (vm, lease, at, placed) in ended {
            let values = params![
                vm.to_string(),
                ms(lease.granted_ms),
                host_text,
                lease.cpus,
                ms(lease.memory_mib),
                ms(lease.expires_ms),
                ms(*at)
            ];
            if *placed {
                tx.prepare_cached(
                    "INSERT INTO bursts \
                     (vm, granted_at, host, cpus, memory_mib, expires_at, ended_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (vm, granted_at) DO UPDATE \
                     SET expires_at = ?6, ended_at = ?7 WHERE host = ?3",
                )?
                .execute(values)?;
            } else {
                tx.prepare_cached(
                    "UPDATE bursts SET expires_at = ?6, ended_at = ?7 \
                     WHERE vm = ?1 AND granted_at = ?2 AND host = ?3 AND cpus = ?4 \
                     AND memory_mib = ?5",
                )?
                .execute(values)?;
            }
        }
        let named: HashSet<(String, i64)> = leases
            .iter()
            .map(|(vm, lease)| (vm.to_string(), ms(lease.granted_ms)))
            .chain(
                ended
                    .iter()
                    .map(|(vm, lease, _, _)| (vm.to_string(), ms(lease.granted_ms))),
            )
            .collect();
        let open: Vec<(String, i64)> = tx
            .prepare_cached(
                "SELECT vm, granted_at FROM bursts WHERE host = ?1 AND ended_at IS NULL",
            )?
            .query_map(params![host_text], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let now = now_ms();
        for key in open.into_iter().filter(|key| !named.contains(key)) {
            tx.prepare_cached(
                "UPDATE bursts SET ended_at = MIN(?3, expires_at) WHERE vm = ?1 AND granted_at = ?2",
            )?
            .execute(params![key.0, key.1, now])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A VM's leases, oldest first.
    pub fn bursts_of(&self, vm: VmId) -> Result<Vec<BurstRow>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT cpus, memory_mib, granted_at, COALESCE(ended_at, expires_at) FROM bursts \
             WHERE vm = ?1 ORDER BY granted_at",
        )?;
        let rows = stmt.query_map(params![vm.to_string()], |row| {
            Ok(BurstRow {
                cpus: row.get(0)?,
                memory_mib: row.get::<_, i64>(1)?.max(0) as u64,
                from_ms: row.get(2)?,
                to_ms: row.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every VM with a lease that was in force within `[from_ms, to_ms)`.
    pub fn vms_with_bursts(&self, from_ms: i64, to_ms: i64) -> Result<Vec<VmId>, StoreError> {
        let db = self.reader();
        let mut stmt = db.prepare_cached(
            "SELECT DISTINCT vm FROM bursts WHERE granted_at < ?2 \
             AND COALESCE(ended_at, expires_at) > ?1",
        )?;
        let rows = stmt.query_map(params![from_ms, to_ms], |row| row.get::<_, String>(0))?;
        rows.map(|vm| parse_uuid(&vm?)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(granted_ms: u64, expires_ms: u64) -> BurstLease {
        BurstLease {
            cpus: 1,
            memory_mib: 64,
            granted_ms,
            expires_ms,
        }
    }

    #[test]
    fn a_lease_ends_when_its_host_no_longer_names_it_or_at_its_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("herd.db")).expect("store");
        let (host, other) = (HostId::from_u128(1), HostId::from_u128(2));
        let (a, b) = (VmId::from_u128(10), VmId::from_u128(11));
        let now = now_ms() as u64;
        store
            .record_bursts(
                host,
                &[
                    (a, lease(now - 5_000, now + 60_000)),
                    (b, lease(now - 5_000, now - 1_000)),
                ],
                &[],
            )
            .expect("record");
        // A renewal moves the expiry; another host's report ends nothing of this one's.
        store
            .record_bursts(host, &[(a, lease(now - 5_000, now + 120_000))], &[])
            .expect("renew");
        store.record_bursts(other, &[], &[]).expect("other host");
        let a_rows = store.bursts_of(a).expect("a");
        assert_eq!(a_rows.len(), 1);
        assert_eq!(
            a_rows[0].to_ms,
            ms(now + 120_000),
            "open: billed to its expiry"
        );
        let b_rows = store.bursts_of(b).expect("b");
        assert_eq!(
            b_rows[0].to_ms,
            ms(now - 1_000),
            "ended at its expiry, before it was missed"
        );
        store.record_bursts(host, &[], &[]).expect("none left");
        let ended = store.bursts_of(a).expect("a")[0].to_ms;
        assert!(
            ended >= ms(now) && ended < ms(now + 60_000),
            "ended when missed: {ended}"
        );
        // Ended while the server was away: billed if its VM is the host's, or if the
        // host had reported it in force; another host cannot end or add them.
        let (c, d) = (VmId::from_u128(12), VmId::from_u128(13));
        let early = lease(now - 9_000, now - 8_000);
        store
            .record_bursts(
                host,
                &[],
                &[
                    (c, early, now - 8_500, true),
                    (d, early, now - 8_500, false),
                ],
            )
            .expect("ended");
        assert_eq!(store.bursts_of(c).expect("c")[0].to_ms, ms(now - 8_500));
        assert!(
            store.bursts_of(d).expect("d").is_empty(),
            "not the host's to bill"
        );
        store
            .record_bursts(
                other,
                &[],
                &[(a, lease(now - 5_000, now + 120_000), now, false)],
            )
            .expect("forged");
        assert_eq!(
            store.bursts_of(a).expect("a")[0].to_ms,
            ended,
            "another host ends nothing"
        );
        let with = store
            .vms_with_bursts(ms(now) - 10_000, ms(now))
            .expect("vms");
        assert_eq!(with.len(), 3);
    }
}
