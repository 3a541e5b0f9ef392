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
        // Checked: the integer part may already be within one multiplier of u128::MAX.
        bytes = bytes.checked_add(part / scale).ok_or_else(bad)?;
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
    fn a_fraction_at_the_u128_edge_is_refused_not_wrapped() {
        // Found by `parse_size_at_the_u128_edge`: the fraction's bytes overflowed the sum.
        assert!(parse_size("s", "340282366920938463463374607431768211.999k").is_err());
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

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Modest case counts (the unit test run stays short in a debug build); nothing is written
    /// into the source tree when a case fails: the seed is in the failure message instead.
    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    const ALL: [&str; 12] = [
        "k", "Ki", "M", "Mi", "G", "Gi", "T", "Ti", "P", "Pi", "E", "Ei",
    ];

    fn multiplier(suffix: &str) -> u128 {
        SUFFIXES.iter().find(|(s, _)| *s == suffix).unwrap().1
    }

    /// What `human_bytes` printed, as exact bytes (value × unit), without going through the
    /// parser under test.
    fn human_value(h: &str) -> f64 {
        let (n, unit) = h.split_once(' ').unwrap();
        let n: f64 = n.parse().unwrap();
        let pow = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
            .iter()
            .position(|u| *u == unit)
            .unwrap_or_else(|| panic!("unit of {h:?}"));
        n * 1024f64.powi(pow as i32)
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn parse_size_never_panics(s in any::<String>()) {
            let _ = parse_size("size", &s);
        }

        /// Strings near the grammar, where the arithmetic happens: digits, dots, spaces and a
        /// suffix. Anything accepted is positive and made only of those.
        #[test]
        fn parse_size_near_the_grammar(
            s in "[ ]?[0-9]{0,40}(\\.[0-9]{0,20})?[.]?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|i|K|B|)[ ]?"
        ) {
            match parse_size("--size", &s) {
                Ok(n) => {
                    prop_assert!(n > 0);
                    let body = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic());
                    prop_assert!(body.chars().all(|c| c.is_ascii_digit() || c == '.'), "{s:?}");
                }
                Err(e) => prop_assert!(e.to_string().contains("--size"), "{e}"),
            }
        }

        /// The integer part as large as the multiplier allows, plus a fraction: the sum must
        /// not overflow (it panicked in debug builds and wrapped in release ones, where
        /// "340282366920938463463374607431768211.999k" came out as 543 bytes).
        #[test]
        fn parse_size_at_the_u128_edge(
            suffix in prop::sample::select(&ALL[..]),
            below in 0u128..4,
            frac in "[0-9]{1,18}",
        ) {
            let int = u128::MAX / multiplier(suffix) - below;
            let r = parse_size("s", &format!("{int}.{frac}{suffix}"));
            // Far above u64: never accepted.
            prop_assert!(r.is_err());
        }

        /// A whole number of any suffix parses to exactly that many bytes, or is refused when
        /// it does not fit in u64.
        #[test]
        fn whole_quantities_parse_exactly(
            n in prop_oneof![1u64..2048, 1u64..u64::MAX],
            suffix in prop::sample::select(&ALL[..]),
        ) {
            let want = u128::from(n) * multiplier(suffix);
            let got = parse_size("s", &format!("{n}{suffix}"));
            match u64::try_from(want) {
                Ok(w) => prop_assert_eq!(got.unwrap(), w),
                Err(_) => prop_assert!(got.is_err()),
            }
            prop_assert_eq!(parse_size("s", &n.to_string()).unwrap(), n);
        }

        /// A decimal quantity is exact when it is a whole number of bytes, and refused (naming
        /// why) when it is not.
        #[test]
        fn decimal_quantities_are_exact_or_refused(
            int in 0u64..5000,
            frac in "[0-9]{1,6}",
            suffix in prop::sample::select(&ALL[..]),
        ) {
            let scale = 10u128.pow(frac.len() as u32);
            let f: u128 = frac.parse().unwrap();
            let m = multiplier(suffix);
            let exact = u128::from(int) * m + f * m / scale;
            let r = parse_size("s", &format!("{int}.{frac}{suffix}"));
            if !(f * m).is_multiple_of(scale) {
                prop_assert!(r.unwrap_err().to_string().contains("whole number of bytes"));
            } else if exact == 0 || exact > u128::from(u64::MAX) {
                prop_assert!(r.is_err());
            } else {
                prop_assert_eq!(u128::from(r.unwrap()), exact);
            }
        }

        /// Suffixes order as their values: k < Ki < M < Mi < … < E < Ei, for any count.
        #[test]
        fn suffixes_order_by_value(n in 1u64..=15) {
            let sizes: Vec<u64> = ALL
                .iter()
                .map(|s| parse_size("s", &format!("{n}{s}")).unwrap())
                .collect();
            prop_assert!(sizes.windows(2).all(|w| w[0] < w[1]), "{sizes:?}");
            // And the binary ones step by 1024.
            for w in ALL.iter().filter(|s| s.ends_with('i')).collect::<Vec<_>>().windows(2) {
                let lo = parse_size("s", &format!("{}{}", n * 1024, w[0])).unwrap();
                prop_assert_eq!(lo, parse_size("s", &format!("{n}{}", w[1])).unwrap());
            }
        }

        /// `human_bytes` says within 5% what it renders (one decimal of a unit of at least 1),
        /// exactly below 1 KiB; it never decreases as bytes grow; and its text, written as a
        /// quantity, parses back to the same value unless that is not a whole number of bytes
        /// (`1.3 KiB`) or not a u64 (`16.0 EiB`).
        #[test]
        fn human_bytes_round_trips(x in prop_oneof![0u64..4096, any::<u64>()], dy in any::<u64>()) {
            let h = human_bytes(x);
            let v = human_value(&h);
            if x < 1024 {
                prop_assert_eq!(h.clone(), format!("{x} B"));
            }
            prop_assert!((v - x as f64).abs() <= 0.05 * x as f64 + 1e-9, "{x} → {h}");
            let y = x.saturating_add(dy >> (dy % 64));
            prop_assert!(human_value(&human_bytes(y)) >= v, "{x} {y}");
            if x >= 1024 {
                let q = h.replace(' ', "").trim_end_matches('B').to_string();
                match parse_size("s", &q) {
                    Ok(p) => prop_assert!((p as f64 - v).abs() <= 1.0, "{h} → {p}"),
                    // Near u64::MAX the rounding reaches "16.0 EiB", which does not fit.
                    Err(e) => prop_assert!(
                        e.to_string().contains("whole number") || v >= u64::MAX as f64,
                        "{h}: {e}"
                    ),
                }
            }
        }

        #[test]
        fn parse_duration_never_panics(s in any::<String>()) {
            let _ = parse_duration("d", &s);
        }

        /// `N<unit>` is N times the unit's seconds (refused when zero or beyond u64), and the
        /// units order s < m < h < d < w.
        #[test]
        fn durations_are_exact_and_ordered(
            n in prop_oneof![0u64..100_000, any::<u64>()],
            pad in "[ ]{0,2}",
        ) {
            let units = [('s', 1u128), ('m', 60), ('h', 3600), ('d', 86_400), ('w', 604_800)];
            let mut last = 0;
            for (u, secs) in units {
                let r = parse_duration("d", &format!("{pad}{n}{u}{pad}"));
                let want = u128::from(n) * secs;
                if n == 0 || want > u128::from(u64::MAX) {
                    prop_assert!(r.is_err());
                } else {
                    let got = r.unwrap();
                    prop_assert_eq!(u128::from(got), want);
                    prop_assert!(got > last);
                    last = got;
                }
            }
        }
    }
}
