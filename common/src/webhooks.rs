//! Where a webhook may point (SPEC §5.11 "Spend alerts"): the one rule the
//! gateway applies when a URL is stored and the worker again before every
//! delivery, so a user cannot aim the worker at internal services.
//!
//! In production a URL must be `https://`, and every address its host
//! resolves to must be public: not loopback, private (RFC 1918, ULA),
//! link-local (cloud metadata lives at 169.254.169.254), CGNAT, unspecified,
//! multicast, broadcast, documentation, benchmarking or otherwise reserved;
//! IPv6 forms that embed an IPv4 address (v4-mapped, v4-compatible, NAT64,
//! 6to4) are judged by that address. The worker resolves the host itself,
//! checks every address and connects only to a checked one, so a DNS answer
//! that changes between the check and the connection (rebinding) cannot
//! redirect it. In development `http://` and any address are allowed (tests
//! run their receiver on 127.0.0.1).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::valid::{check_text, TextRule};

/// Longest webhook URL, in characters.
pub const MAX_URL_CHARS: usize = 2048;

/// A webhook URL of the right shape for `production` (addresses not checked
/// yet: see [`refused_ip`] and the callers' resolution). Returns the parsed
/// URL or why it is refused.
pub fn parse_url(raw: &str, production: bool) -> Result<url::Url, String> {
    check_text(raw, TextRule::Label, MAX_URL_CHARS)?;
    if raw.chars().any(char::is_whitespace) {
        return Err("must not contain whitespace".into());
    }
    let url = url::Url::parse(raw).map_err(|e| format!("is not a URL: {e}"))?;
    match (url.scheme(), production) {
        ("https", _) | ("http", false) => {}
        ("http", true) => return Err("must be https:// in production".into()),
        _ => return Err("must be an http:// or https:// URL".into()),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    let Some(host) = url.host() else {
        return Err("must name a host".into());
    };
    if production {
        match host {
            url::Host::Ipv4(ip) => refuse(IpAddr::V4(ip))?,
            url::Host::Ipv6(ip) => refuse(IpAddr::V6(ip))?,
            url::Host::Domain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                if d == "localhost" || d.ends_with(".localhost") {
                    return Err("must not point at a loopback address".into());
                }
            }
        }
    }
    Ok(url)
}

/// The host and port to resolve for `url` (the port the scheme implies when
/// the URL names none).
pub fn host_and_port(url: &url::Url) -> Option<(String, u16)> {
    let host = match url.host()? {
        url::Host::Domain(d) => d.to_string(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    };
    Some((host, url.port_or_known_default()?))
}

fn refuse(ip: IpAddr) -> Result<(), String> {
    match refused_ip(ip) {
        Some(class) => Err(format!("must not point at a {class} address ({ip})")),
        None => Ok(()),
    }
}

/// Every address must pass; an empty answer is refused too.
pub fn check_addresses(ips: &[IpAddr]) -> Result<(), String> {
    if ips.is_empty() {
        return Err("does not resolve to any address".into());
    }
    ips.iter().try_for_each(|ip| refuse(*ip))
}

/// The class of an address a production webhook may not reach, or `None`
/// for a public one.
pub fn refused_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "unspecified",
        (127, _, _) => "loopback",
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "shared (CGNAT)",
        (192, 0, 0) => "protocol-assignment",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = embedded_v4(ip) {
        return refused_v4(v4);
    }
    let s = ip.segments();
    Some(match s[0] {
        0xfc00..=0xfdff => "unique-local",
        0xfe80..=0xfebf => "link-local",
        0xfec0..=0xfeff => "site-local",
        0xff00..=0xffff => "multicast",
        0x2001 if s[1] == 0x0db8 => "documentation",
        // Teredo tunnels to an address we cannot see.
        0x2001 if s[1] == 0 => "tunnel (Teredo)",
        0x0100 if s[1..4] == [0, 0, 0] => "discard",
        // The rest of ::/8 (what is not v4-mapped or v4-compatible) is reserved.
        0x0000 => "reserved",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 one stands for: v4-mapped (`::ffff:a.b.c.d`),
/// v4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) and 6to4
/// (`2002:AABB:CCDD::`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(tail()),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail()),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_loopback_link_local_and_reserved_v4_addresses_are_refused() {
        for (a, class) in [
            ("0.0.0.0", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.255", "shared (CGNAT)"),
            ("192.0.2.7", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
        ] {
            assert_eq!(refused_ip(ip(a)), Some(class), "{a}");
        }
        for a in [
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "100.128.0.1",
            "1.1.1.1",
            "192.169.0.1",
        ] {
            assert_eq!(refused_ip(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn v6_forms_are_judged_and_those_that_embed_v4_by_their_v4_address() {
        for (a, class) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fd00::1", "unique-local"),
            ("fc12::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("2001::1", "tunnel (Teredo)"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.1.2.3", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:c0a8:0101::1", "private"),
        ] {
            assert_eq!(refused_ip(ip(a)), Some(class), "{a}");
        }
        for a in [
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "2002:0808:0808::1",
            "64:ff9b::808:808",
        ] {
            assert_eq!(refused_ip(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn production_urls_must_be_https_and_not_name_an_internal_host() {
        assert!(parse_url("https://hooks.example.com/x?y=1", true).is_ok());
        for bad in [
            "http://hooks.example.com/x",
            "https://10.0.0.1/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://localhost/hook",
            "https://a.localhost./hook",
            "https://127.0.0.1:8443/",
        ] {
            assert!(parse_url(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn development_allows_http_to_loopback_and_every_mode_refuses_bad_shapes() {
        assert!(parse_url("http://127.0.0.1:9999/hook", false).is_ok());
        for bad in [
            "ftp://example.com/x",
            "file:///etc/passwd",
            "https://user:pw@example.com/",
            "https://exa\0mple.com/",
            "https://example.com/\n",
            "https://example.com/ x",
            "not a url",
            "",
            "mailto:a@example.com",
        ] {
            assert!(parse_url(bad, false).is_err(), "{bad:?}");
            assert!(parse_url(bad, true).is_err(), "{bad:?}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert!(parse_url(&long, false).is_err());
    }

    #[test]
    fn every_resolved_address_must_pass_and_none_is_refused() {
        assert!(check_addresses(&[ip("8.8.8.8"), ip("2606:4700::1")]).is_ok());
        assert!(check_addresses(&[ip("8.8.8.8"), ip("10.0.0.1")]).is_err());
        assert!(check_addresses(&[]).is_err());
    }

    #[test]
    fn the_port_is_the_schemes_when_the_url_names_none() {
        let u = parse_url("https://example.com/x", true).unwrap();
        assert_eq!(host_and_port(&u), Some(("example.com".into(), 443)));
        let u = parse_url("http://127.0.0.1:9/x", false).unwrap();
        assert_eq!(host_and_port(&u), Some(("127.0.0.1".into(), 9)));
    }
}
