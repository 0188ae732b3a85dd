//! One grammar for every size a flag or config key takes (`--memory`,
//! `--log-max-size`, the import limits): a number of bytes, or with a
//! binary unit `k`, `m`, `g`, `t` (either case, an optional `b` or `ib`
//! after it, spaces before it), decimals allowed with a unit (`1.5G`).
//! Disk images (`host compose image --size`) take it too.

use anyhow::{anyhow, bail, Result};

pub fn parse(text: &str) -> Result<u64> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match body.as_bytes().last() {
        Some(b'k') => (&body[..body.len() - 1], 10),
        Some(b'm') => (&body[..body.len() - 1], 20),
        Some(b'g') => (&body[..body.len() - 1], 30),
        Some(b't') => (&body[..body.len() - 1], 40),
        // (Named as written: lowercasing keeps byte positions.)
        Some(c) if c.is_ascii_alphabetic() => bail!(
            "size {text:?}: unknown unit {:?} (use a number of bytes, or k, m, g, t)",
            t.as_bytes()[body.len() - 1] as char
        ),
        _ => (body, 0),
    };
    let num = num.trim_end();
    let bad = || anyhow!("size {text:?} is not a size like 4096, 256M or 1.5G");
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(1 << shift)
            .ok_or_else(|| anyhow!("size {text:?} is too large"));
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * (1u64 << shift) as f64;
    if shift == 0 || !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn one_grammar_for_every_size() {
        for (text, bytes) in [
            ("123", 123),
            ("64k", 64 << 10),
            ("64K", 64 << 10),
            ("256M", 256 << 20),
            ("256MiB", 256 << 20),
            ("1g", 1 << 30),
            ("1.5G", 3 << 29),
            ("16G", 16 << 30),
            ("1T", 1 << 40),
            ("10mb", 10 << 20),
            ("8GiB", 8 << 30),
            ("8 G", 8 << 30),
            ("4096", 4096),
            ("0", 0),
        ] {
            assert_eq!(parse(text).unwrap(), bytes, "{text}");
        }
        for bad in [
            "",
            "M",
            "-1M",
            "1X",
            "12Q",
            "1.5",
            "1e3",
            "99999999999T",
            "1..5G",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse("12Q")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
    }
}
