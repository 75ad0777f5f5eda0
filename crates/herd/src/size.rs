//! Sizes as people type them (`512M`, `2G`, `1.5GiB`), in MiB: a disk asked for in
//! bytes by mistake must be refused, not rounded to nothing.

/// Parses a size into MiB: a bare number is MiB; `K`/`KiB` must come to whole MiB;
/// `M`/`MiB`, `G`/`GiB` and `T`/`TiB` scale by 1024.
pub fn parse_mib(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: write e.g. 512M, 2G or 1T"))?;
    let kib_per_unit = match unit.trim().to_ascii_lowercase().as_str() {
        "k" | "kib" | "kb" => 1.0,
        "" | "m" | "mib" | "mb" => 1024.0,
        "g" | "gib" | "gb" => 1024.0 * 1024.0,
        "t" | "tib" | "tb" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?}: use M, G or T")),
    };
    let kib = value * kib_per_unit;
    if kib.fract() != 0.0 || kib % 1024.0 != 0.0 {
        return Err(format!("{text:?} is not a whole number of MiB"));
    }
    let mib = kib / 1024.0;
    if !(1.0..=(u64::MAX >> 20) as f64).contains(&mib) {
        return Err(format!("{text:?} is out of range: at least 1M"));
    }
    Ok(mib as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_mib;

    #[test]
    fn units_scale_by_1024() {
        assert_eq!(parse_mib("64"), Ok(64));
        assert_eq!(parse_mib("64M"), Ok(64));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert_eq!(parse_mib("1.5GiB"), Ok(1536));
        assert_eq!(parse_mib("1t"), Ok(1 << 20));
        assert_eq!(parse_mib("2048K"), Ok(2));
    }

    #[test]
    fn nonsense_says_what_is_wrong() {
        for bad in ["", "G", "2X", "0", "0.5M", "1000K", "-1G", "1..2G"] {
            assert!(parse_mib(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
