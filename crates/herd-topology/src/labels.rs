//! Host labels: free-form `key=value` pairs an operator sets at join or later, of which
//! three (`region`, `zone`, `rack`) place a host. Labels end up in shell commands'
//! output, JSON and URLs, so they are held to a small alphabet, and to a small number.

use std::collections::BTreeMap;

/// A host's labels, ordered by key so that they print and compare the same everywhere.
pub type Labels = BTreeMap<String, String>;

/// The labels that place a host, widest first.
pub const PLACE_KEYS: [&str; 3] = ["region", "zone", "rack"];

/// At most this many labels per host.
pub const MAX_LABELS: usize = 32;
const MAX_KEY: usize = 63;
const MAX_VALUE: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label key {0:?}: 1 to 63 characters of a-z, 0-9, '.', '_', '-' and '/', starting with a letter or digit")]
    Key(String),
    #[error(
        "label {key}={value:?}: a value is 1 to 63 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
    )]
    Value { key: String, value: String },
    #[error("{0} labels, over the limit of {MAX_LABELS}")]
    TooMany(usize),
}

/// Checks every label; the first bad one is the error.
pub fn check_labels(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany(labels.len()));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_KEY
            && key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && key.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'-' | b'/')
            });
        if !key_ok {
            return Err(LabelError::Key(key.clone()));
        }
        let value_ok = !value.is_empty()
            && value.len() <= MAX_VALUE
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !value_ok {
            return Err(LabelError::Value {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    Ok(())
}

/// Where a host is: its region, zone and rack, each empty when not labelled. Two hosts
/// without a rack label share the unnamed rack of their zone: an unlabelled fleet is
/// one group, ordered by round trips alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    pub region: String,
    pub zone: String,
    pub rack: String,
}

impl Place {
    pub fn of(labels: &Labels) -> Place {
        let get = |key: &str| labels.get(key).cloned().unwrap_or_default();
        Place {
            region: get("region"),
            zone: get("zone"),
            rack: get("rack"),
        }
    }

    /// The group this place belongs to at `level` (0 region, 1 zone, 2 rack): the
    /// place cut after that level, so that racks of the same name in two zones differ.
    pub fn group(&self, level: usize) -> (&str, &str, &str) {
        match level {
            0 => (&self.region, "", ""),
            1 => (&self.region, &self.zone, ""),
            _ => (&self.region, &self.zone, &self.rack),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn good_labels_pass_and_each_kind_of_bad_one_is_named() {
        assert_eq!(
            check_labels(&labels(&[
                ("rack", "r1"),
                ("zone", "eu-1a"),
                ("herd.io/gpu", "A100")
            ])),
            Ok(())
        );
        assert!(matches!(
            check_labels(&labels(&[("Rack", "r1")])),
            Err(LabelError::Key(_))
        ));
        assert!(matches!(
            check_labels(&labels(&[("-rack", "r1")])),
            Err(LabelError::Key(_))
        ));
        assert!(matches!(
            check_labels(&labels(&[("", "r1")])),
            Err(LabelError::Key(_))
        ));
        assert!(matches!(
            check_labels(&labels(&[("rack", "")])),
            Err(LabelError::Value { .. })
        ));
        assert!(matches!(
            check_labels(&labels(&[("rack", "r 1")])),
            Err(LabelError::Value { .. })
        ));
        assert!(matches!(
            check_labels(&labels(&[("rack", &"x".repeat(64))])),
            Err(LabelError::Value { .. })
        ));
        let many: Labels = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(check_labels(&many), Err(LabelError::TooMany(33)));
    }

    #[test]
    fn a_place_reads_its_three_labels_and_groups_cut_at_a_level() {
        let place = Place::of(&labels(&[("region", "eu"), ("rack", "r2"), ("os", "x")]));
        assert_eq!(place.region, "eu");
        assert_eq!(place.zone, "");
        assert_eq!(place.rack, "r2");
        assert_eq!(place.group(0), ("eu", "", ""));
        assert_eq!(place.group(2), ("eu", "", "r2"));
    }
}
