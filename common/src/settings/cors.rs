//! `gateway.cors_origins` (SPEC §5): which browser origins may call the API.
//! An entry is an origin (`https://app.example`, `http://localhost:3000`) or
//! `scheme://*`, every origin of that scheme (VS Code webviews:
//! `vscode-webview://*`). The rules are plain functions: checked once at
//! start ([`parse`]), then asked per request ([`Origins::allows`]).

/// One entry of `gateway.cors_origins`, normalized to lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginRule {
    /// Exactly this origin (`scheme://host[:port]`).
    Exact(String),
    /// Every origin of this scheme (the entry `scheme://*`).
    Scheme(String),
}

/// The allowed origins; empty allows none (no CORS header at all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins(Vec<OriginRule>);

/// Parses the list; an entry that is not an origin or `scheme://*` is refused
/// with the reason. Empty entries (a trailing comma) are skipped.
pub fn parse(entries: &[String]) -> Result<Origins, String> {
    let mut rules = Vec::new();
    for raw in entries {
        let entry = raw.trim();
        if entry.is_empty() {
            continue;
        }
        let Some((scheme, rest)) = entry.split_once("://") else {
            return Err(format!(
                "{entry:?} is not an origin (scheme://host[:port] or scheme://*)"
            ));
        };
        if !valid_scheme(scheme) {
            return Err(format!("{entry:?} has no valid scheme"));
        }
        let scheme = scheme.to_ascii_lowercase();
        if rest == "*" {
            rules.push(OriginRule::Scheme(scheme));
        } else if valid_authority(rest) {
            rules.push(OriginRule::Exact(format!(
                "{scheme}://{}",
                rest.to_ascii_lowercase()
            )));
        } else {
            return Err(format!(
                "{entry:?} is not an origin: no path, query, user or wildcard besides scheme://*"
            ));
        }
    }
    Ok(Origins(rules))
}

fn valid_scheme(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

/// `host[:port]` (an IPv6 literal in brackets included): no path, user or wildcard.
fn valid_authority(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

impl Origins {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a request's `Origin` is allowed. `null` (opaque origins) and
    /// anything that is not `scheme://authority` never are.
    pub fn allows(&self, origin: &str) -> bool {
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false;
        };
        if !valid_scheme(scheme) || !valid_authority(rest) {
            return false;
        }
        self.0.iter().any(|rule| match rule {
            OriginRule::Exact(o) => o.eq_ignore_ascii_case(origin),
            OriginRule::Scheme(s) => s.eq_ignore_ascii_case(scheme),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Origins {
        parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_listed_origin_or_one_of_a_listed_scheme_is_allowed_and_nothing_else() {
        let o = origins(&[
            "https://a.example",
            "vscode-webview://*",
            "http://localhost:3000",
            "",
        ]);
        for ok in [
            "https://a.example",
            "HTTPS://A.example",
            "vscode-webview://1a2b3c",
            "http://localhost:3000",
        ] {
            assert!(o.allows(ok), "{ok}");
        }
        for no in [
            "https://b.example",
            "http://a.example",
            "https://a.example:8443",
            "https://a.example.evil",
            "https://a.example/",
            "http://localhost",
            "vscode-webview://",
            "vscode-file://x",
            "null",
            "",
            "*",
        ] {
            assert!(!o.allows(no), "{no}");
        }
        assert!(!Origins::default().allows("https://a.example"));
    }

    #[test]
    fn entries_that_are_not_origins_are_refused() {
        for bad in [
            "a.example",
            "https://a.example/path",
            "https://*.example",
            "https://u@a.example",
            "1x://*",
            "*",
        ] {
            assert!(parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert_eq!(
            origins(&["HTTPS://A.Example", "Vscode-Webview://*"]).0,
            vec![
                OriginRule::Exact("https://a.example".into()),
                OriginRule::Scheme("vscode-webview".into())
            ]
        );
    }

    #[test]
    fn the_environment_gives_a_comma_separated_list_and_a_bad_entry_stops_start_up() {
        let load = |list: &str| {
            let vars = [
                ("JWT_SECRET", "s3cret"),
                ("APP__GATEWAY__CORS_ORIGINS", list),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            super::super::Settings::load_from(std::path::Path::new("/nonexistent"), &vars)
        };
        let s = load("https://a.example,vscode-webview://*").unwrap();
        assert_eq!(
            s.gateway.cors_origins,
            ["https://a.example", "vscode-webview://*"]
        );
        let s = load("https://a.example").unwrap();
        assert_eq!(s.gateway.cors_origins, ["https://a.example"]);
        let e = load("https://a.example/x").unwrap_err();
        assert!(e.to_string().contains("gateway.cors_origins"), "{e}");
    }
}
