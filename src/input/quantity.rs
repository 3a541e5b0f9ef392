//! Sizes in Kubernetes quantity form (`512Mi`, `20Gi`, `1G`, `1500M`, `1.5Gi`), durations in the
//! `14d` / `12h` form, and their human rendering.

use crate::error::{Error, Result};

const SUFFIXES: &[(&str, u128)] = &[
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
];

/// Parses a Kubernetes quantity into bytes. `what` names the field in errors. Zero is rejected:
/// no jobcachefs size can be empty.
pub fn parse_size(what: &str, value: &str) -> Result<u64> {
    let fix = "use a positive Kubernetes quantity such as 512Mi, 20Gi or 1G";
    let bad = || Error::invalid(format!("{what} {value:?} is not a valid size: {fix}"));
    let v = value.trim();
    let (number, multiplier) = SUFFIXES
        .iter()
        .find_map(|(s, m)| v.strip_suffix(s).map(|n| (n, *m)))
        .unwrap_or((v, 1));
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) if !(f.contains('.') || i.is_empty() && f.is_empty()) => (i, f),
        Some(_) => return Err(bad()),
        None => (number, ""),
    };
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let mut bytes = int.checked_mul(multiplier).ok_or_else(bad)?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(bad());
        }
        let scale = 10u128.pow(frac.len() as u32);
        let f: u128 = frac.parse().map_err(|_| bad())?;
        let part = f.checked_mul(multiplier).ok_or_else(bad)?;
        if part % scale != 0 {
            return Err(Error::invalid(format!(
                "{what} {value:?} is not a whole number of bytes: {fix}"
            )));
        }
        bytes += part / scale;
    }
    if bytes == 0 {
        return Err(Error::invalid(format!("{what} {value:?} is zero: {fix}")));
    }
    u64::try_from(bytes).map_err(|_| bad())
}

/// Renders bytes in binary units with one decimal (`1.5 GiB`), exact bytes below 1 KiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: &[&str] = &["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Parses a duration like `14d`, `12h`, `30m`, `45s` or `2w` into seconds.
pub fn parse_duration(what: &str, value: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(format!(
            "{what} {value:?} is not a valid duration: use a positive whole number followed by s, m, h, d or w (e.g. 14d)"
        ))
    };
    let v = value.trim();
    let unit = v.chars().last().ok_or_else(bad)?;
    let seconds = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 604_800,
        _ => return Err(bad()),
    };
    let n: u64 = v[..v.len() - 1].parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    n.checked_mul(seconds).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantities() {
        assert_eq!(parse_size("s", "512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_size("s", "20Gi").unwrap(), 20 << 30);
        assert_eq!(parse_size("s", "1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("s", "1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_size("s", "4096").unwrap(), 4096);
        assert_eq!(parse_size("s", "1k").unwrap(), 1000);
        assert_eq!(parse_size("s", " 2Ki ").unwrap(), 2048);
    }

    #[test]
    fn rejects_bad_quantities_naming_the_value() {
        for bad in [
            "10Xi",
            "-1",
            "0",
            "0Gi",
            "",
            "Gi",
            "1.2.3",
            "1e3",
            "0.5",
            "99999999Ei",
            "1 Gi",
        ] {
            let err = parse_size("--size", bad).unwrap_err();
            assert!(err.to_string().contains("--size"), "{err}");
            assert!(err.to_string().contains("Kubernetes quantity"), "{err}");
        }
    }

    #[test]
    fn renders_human_sizes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(20 << 30), "20.0 GiB");
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("d", "14d").unwrap(), 14 * 86_400);
        assert_eq!(parse_duration("d", "30m").unwrap(), 1800);
        for bad in ["", "d", "14", "-1d", "0d", "1y", "1.5h"] {
            assert!(parse_duration("--unused-for", bad).is_err(), "{bad}");
        }
    }
}
