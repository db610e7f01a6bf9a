//! The `KEY="value"` format shared by `vm_configs/*.conf` and `.env`: a safe subset of shell
//! assignments, parsed without ever running a shell.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct KvError {
    pub line: usize,
    pub message: String,
}

/// Parses `KEY=value` lines. Blank lines and `#` comments are skipped, `export ` is allowed,
/// values may be bare, `'single'` (literal) or `"double"` quoted (`\"`, `\\`, `\$`, `` \` `` escapes).
/// Later assignments win, as when a shell sources the file.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, KvError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let err = |message: String| KvError {
            line: line_no,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let (key, rest) = line
            .split_once('=')
            .ok_or_else(|| err(format!("expected KEY=\"value\", got {raw:?}")))?;
        if !is_valid_key(key) {
            return Err(err(format!(
                "invalid key {key:?} (letters, digits and _ only, no spaces around =)"
            )));
        }
        let value = parse_value(rest).map_err(err)?;
        out.retain(|(k, _)| k != key);
        out.push((key.to_string(), value));
    }
    Ok(out)
}

fn is_valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(rest: &str) -> Result<String, String> {
    let mut chars = rest.chars().peekable();
    let mut value = String::new();
    match chars.peek() {
        Some('"') => {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated double quote".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\' | '$' | '`')) => value.push(c),
                        Some(c) => {
                            value.push('\\');
                            value.push(c);
                        }
                        None => return Err("unterminated double quote".into()),
                    },
                    Some('$' | '`') => {
                        return Err(
                            "variable expansion and command substitution are not supported; \
                             escape $ and ` with a backslash"
                                .into(),
                        )
                    }
                    Some(c) => value.push(c),
                }
            }
        }
        Some('\'') => {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated single quote".into()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        }
        _ => {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if matches!(c, '"' | '\'' | '$' | '`' | '\\' | ';' | '&' | '|') {
                    return Err(format!(
                        "unquoted value contains {c:?}; put the value in double quotes"
                    ));
                }
                value.push(c);
                chars.next();
            }
        }
    }
    let trailing: String = chars.collect();
    let trailing = trailing.trim();
    if !trailing.is_empty() && !trailing.starts_with('#') {
        return Err(format!("unexpected text after the value: {trailing:?}"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap()
    }

    #[test]
    fn seed_format() {
        let got = kv(
            "# vm_configs/ubuntu-server.conf\nMEMORY=\"2G\"\nCPU=\"2\"\n\
            ADDITIONAL_ARGS=\"-netdev user,id=net0 -device e1000,netdev=net0\"\n",
        );
        assert_eq!(
            got,
            vec![
                ("MEMORY".into(), "2G".into()),
                ("CPU".into(), "2".into()),
                (
                    "ADDITIONAL_ARGS".into(),
                    "-netdev user,id=net0 -device e1000,netdev=net0".into()
                ),
            ]
        );
    }

    #[test]
    fn quoting_styles_and_comments() {
        let got = kv("export A=bare # comment\nB='a b'\nC='lit $x'\nD=\"q \\\"x\\\" \\$y\"\nE=\n");
        assert_eq!(got[0], ("A".into(), "bare".into()));
        assert_eq!(got[1], ("B".into(), "a b".into()));
        assert_eq!(got[2], ("C".into(), "lit $x".into()));
        assert_eq!(got[3], ("D".into(), "q \"x\" $y".into()));
        assert_eq!(got[4], ("E".into(), "".into()));
    }

    #[test]
    fn later_assignment_wins() {
        assert_eq!(kv("A=1\nA=2\n"), vec![("A".into(), "2".into())]);
    }

    #[test]
    fn rejects_what_a_shell_would_run() {
        for bad in [
            "A=\"$(reboot)\"",
            "A=`id`",
            "A=x;rm",
            "A=\"unterminated",
            "A='x",
            "1A=x",
            "A B=x",
            "just text",
            "A=\"x\" y",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.line, 1, "{bad}");
        }
    }

    #[test]
    fn error_names_the_line() {
        let e = parse("A=1\n\nB=\"x\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.to_string().starts_with("line 3:"));
    }
}
