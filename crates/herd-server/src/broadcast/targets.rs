//! Which hosts a broadcast goes to, and why none when none: pure, so that every
//! refusal's reason is tested without hosts.

use crate::store::HostRecord;
use herd_proto::wire::HostId;

/// The hosts other than `source` that are up, run `hypervisor` VMs, carry the label
/// `to` if one is asked, and take transfers (`addr_of` says where); or the reason there
/// is none, as the user reads it.
pub fn receivers<'a, A>(
    hosts: &'a [HostRecord],
    source: HostId,
    hypervisor: &str,
    to: Option<&(String, String)>,
    addr_of: impl Fn(HostId) -> Option<A>,
) -> Result<Vec<(&'a HostRecord, A)>, String> {
    let same_type: Vec<&HostRecord> = hosts
        .iter()
        .filter(|h| h.id != source && h.up)
        .filter(|h| h.hypervisors.iter().any(|t| t.kind == hypervisor))
        .collect();
    if same_type.is_empty() {
        return Err(format!("no other host that is up runs {hypervisor} VMs"));
    }
    let labelled: Vec<&HostRecord> = same_type
        .into_iter()
        .filter(|h| to.is_none_or(|(key, value)| h.labels.get(key) == Some(value)))
        .collect();
    if let (true, Some((key, value))) = (labelled.is_empty(), to) {
        return Err(format!(
            "no other host that is up and runs {hypervisor} VMs has the label {key}={value}"
        ));
    }
    let reachable: Vec<_> = labelled
        .into_iter()
        .filter_map(|h| Some((h, addr_of(h.id)?)))
        .collect();
    if reachable.is_empty() {
        return Err(
            "no other host that could take it takes transfers (none has said where)".into(),
        );
    }
    Ok(reachable)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use herd_proto::wire::HypervisorInfo;
    use uuid::Uuid;

    fn host(kind: &str, up: bool, rack: &str) -> HostRecord {
        HostRecord {
            id: Uuid::now_v7(),
            hostname: format!("h-{kind}"),
            hypervisors: vec![HypervisorInfo {
                kind: kind.into(),
                detail: String::new(),
            }],
            cpus: 2,
            memory_mib: 1024,
            up,
            joined_at_ms: 0,
            agent_version: None,
            labels: [("rack".to_owned(), rack.to_owned())].into_iter().collect(),
        }
    }

    #[test]
    fn every_refusal_says_why() {
        let source = host("qemu", true, "r1");
        let hosts = vec![
            source.clone(),
            host("oci", true, "r1"),
            host("qemu", false, "r2"),
            host("qemu", true, "r2"),
        ];
        let anywhere = |_: HostId| Some(());
        let rack = |r: &str| ("rack".to_owned(), r.to_owned());
        let e = receivers(&hosts, source.id, "sim", None, anywhere).unwrap_err();
        assert_eq!(e, "no other host that is up runs sim VMs");
        let e = receivers(&hosts[..3], source.id, "qemu", None, anywhere).unwrap_err();
        assert!(
            e.contains("runs qemu VMs"),
            "the qemu host that is down does not count: {e}"
        );
        let e = receivers(&hosts, source.id, "qemu", Some(&rack("r9")), anywhere).unwrap_err();
        assert!(e.contains("label rack=r9"), "{e}");
        let e = receivers(&hosts, source.id, "qemu", None, |_| None::<()>).unwrap_err();
        assert!(e.contains("takes transfers"), "{e}");
        let got = receivers(&hosts, source.id, "qemu", Some(&rack("r2")), anywhere).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.id, hosts[3].id);
        let got = receivers(&hosts, source.id, "oci", None, anywhere).unwrap();
        assert_eq!(
            got[0].0.id, hosts[1].id,
            "never the source, whatever it runs"
        );
    }
}
