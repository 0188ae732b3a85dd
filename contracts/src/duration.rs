//! One grammar for every duration cairn reads, from a flag or a config key:
//! terms of a number and a unit, added up — `500ms`, `90s`, `10m`,
//! `1h30m`, `2d`, `1.5s` — or a bare number of seconds (`30`), as systemd
//! reads them. Units: `ms`, `s`, `m`, `h`, `d`.

use std::time::Duration;

use anyhow::{bail, Result};

const EXAMPLES: &str = "500ms, 90s, 10m, 1h30m, 2d or a number of seconds";

/// Parse `text` (see the module doc). Errors say what was wrong with it;
/// callers add which flag or key it came from.
pub fn parse(text: &str) -> Result<Duration> {
    let t = text.trim();
    if t.is_empty() {
        bail!("{text:?} is not a duration: write it like {EXAMPLES}");
    }
    if let Ok(secs) = t.parse::<f64>() {
        return seconds(secs, text);
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let Ok(n) = num.parse::<f64>() else {
            bail!("{text:?} is not a duration: write it like {EXAMPLES}");
        };
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "" => bail!("{text:?}: {num} has no unit (ms, s, m, h, d)"),
            _ => bail!("{text:?}: unknown unit {unit:?} (use ms, s, m, h, d)"),
        };
        total += n * scale;
        rest = next;
    }
    seconds(total, text)
}

fn seconds(secs: f64, text: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| anyhow::anyhow!("{text:?} is not a duration: write it like {EXAMPLES}"))
}

#[cfg(test)]
mod tests {
    use super::parse;
    use std::time::Duration;

    #[test]
    fn one_grammar_for_flags_and_config_keys() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("250ms", Duration::from_millis(250)),
            ("10s", Duration::from_secs(10)),
            ("90s", Duration::from_secs(90)),
            ("2m", Duration::from_secs(120)),
            ("1h30m", Duration::from_secs(5400)),
            ("2d", Duration::from_secs(172_800)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m30s500ms", Duration::from_millis(90_500)),
            ("3", Duration::from_secs(3)),
            (" 10s ", Duration::from_secs(10)),
        ];
        for (text, want) in ok {
            assert_eq!(parse(text).unwrap(), want, "{text:?}");
        }
        for bad in [
            "",
            "h",
            "5x",
            "10 parsecs",
            "1h30",
            "-5s",
            "-1",
            "1..5s",
            "inf",
            "NaN",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
