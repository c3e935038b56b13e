//! `ip-restriction`: allow or deny clients by address (CIDR, IPv4 and
//! IPv6).
//!
//! ```yaml
//! - ip-restriction:
//!     allow: [10.0.0.0/8, "2001:db8::/32", 192.168.1.7]
//!     deny: [10.9.0.0/16]
//!     trusted_proxies: [172.16.0.0/12]   # optional, see below
//!     status: 403                        # default 403
//!     message: "not allowed from here"   # default "access from this address is not allowed"
//! ```
//!
//! `deny` wins: an address in it is refused. When `allow` is given, only
//! addresses in it pass (and a client whose address is unknown is
//! refused). The client's address is the one the gateway determined with
//! `server.trusted_proxies`; a plugin-level `trusted_proxies` instead
//! walks `X-Forwarded-For` from the right, from the TCP peer, past these
//! proxies, and takes the first address that is not one of them.

use http::StatusCode;
use ipnet::IpNet;
use serde::Deserialize;

use super::status_in;
use crate::{Flow, Plugin, PluginBuilder, PluginCtx, RequestHeader, Response};

/// `ip-restriction` config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRestrictionConfig {
    /// Only these may pass (when given).
    #[serde(default)]
    pub allow: Vec<String>,
    /// These are refused.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Proxies whose `X-Forwarded-For` is believed, for this plugin.
    #[serde(default)]
    pub trusted_proxies: Option<Vec<String>>,
    /// Status of a refusal (400–599).
    #[serde(default = "default_status")]
    pub status: u16,
    /// Message of a refusal.
    #[serde(default = "default_message")]
    pub message: String,
}

fn default_status() -> u16 {
    403
}

fn default_message() -> String {
    "access from this address is not allowed".to_owned()
}

/// The `ip-restriction` plugin.
#[derive(Debug)]
pub struct IpRestriction {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    trusted: Option<Vec<IpNet>>,
    refusal: Response,
}

/// `10.0.0.0/8`, or a bare address (a /32 or /128).
fn parse_net(s: &str, what: &str, i: usize) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("{what}[{i}]: `{s}` is not an IP address or CIDR block"))
}

fn parse_nets(list: &[String], what: &str) -> Result<Vec<IpNet>, String> {
    list.iter()
        .enumerate()
        .map(|(i, s)| parse_net(s, what, i))
        .collect()
}

fn contains(nets: &[IpNet], ip: std::net::IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is its IPv4 address.
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

impl IpRestriction {
    fn client(&self, req: &RequestHeader, ctx: &PluginCtx) -> Option<std::net::IpAddr> {
        let Some(trusted) = &self.trusted else {
            return ctx.client_ip;
        };
        let mut ip = canonical(ctx.peer_ip?);
        if !contains(trusted, ip) {
            return Some(ip);
        }
        let hops: Vec<&str> = req
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            match hop.parse::<std::net::IpAddr>() {
                Ok(next) => {
                    ip = canonical(next);
                    if !contains(trusted, ip) {
                        return Some(ip);
                    }
                }
                Err(_) => return Some(ip),
            }
        }
        Some(ip)
    }
}

impl Plugin for IpRestriction {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn request(&self, req: &mut RequestHeader, ctx: &mut PluginCtx) -> Flow {
        let allowed = match self.client(req, ctx) {
            Some(ip) => {
                !contains(&self.deny, ip) && (self.allow.is_empty() || contains(&self.allow, ip))
            }
            None => self.allow.is_empty(),
        };
        if allowed {
            Flow::Continue
        } else {
            Flow::Respond(self.refusal.clone())
        }
    }
}

impl PluginBuilder for IpRestriction {
    const NAME: &'static str = "ip-restriction";
    type Config = IpRestrictionConfig;

    fn build(c: IpRestrictionConfig) -> Result<Self, String> {
        if c.allow.is_empty() && c.deny.is_empty() {
            return Err("give `allow`, `deny` or both".to_owned());
        }
        let status = status_in(c.status, 400..=599, "status")?;
        Ok(Self {
            allow: parse_nets(&c.allow, "allow")?,
            deny: parse_nets(&c.deny, "deny")?,
            trusted: c
                .trusted_proxies
                .as_deref()
                .map(|t| parse_nets(t, "trusted_proxies"))
                .transpose()?,
            refusal: Response::error(
                status,
                if status == StatusCode::FORBIDDEN {
                    "ip_forbidden"
                } else {
                    "ip_restricted"
                },
                &c.message,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::test_util::{build, ctx, request};

    fn verdict(p: &IpRestriction, client: &str, xff: Option<&str>) -> bool {
        let mut req = match xff {
            Some(x) => request("GET", "/", &[("x-forwarded-for", x)]),
            None => request("GET", "/", &[]),
        };
        let mut c = ctx();
        c.client_ip = Some(client.parse().unwrap());
        c.peer_ip = Some(client.parse().unwrap());
        matches!(p.request(&mut req, &mut c), Flow::Continue)
    }

    #[test]
    fn test_allow_and_deny_for_ipv4_and_ipv6() {
        let p: IpRestriction = build(
            "allow: [10.0.0.0/8, '2001:db8::/32', 192.168.1.7]\ndeny: [10.9.0.0/16, '2001:db8:bad::/48']\n",
        )
        .unwrap();
        for (ip, ok) in [
            ("10.1.2.3", true),
            ("10.9.0.1", false),
            ("192.168.1.7", true),
            ("192.168.1.8", false),
            ("::ffff:10.1.2.3", true),
            ("2001:db8::1", true),
            ("2001:db8:bad::1", false),
            ("2001:db9::1", false),
        ] {
            assert_eq!(verdict(&p, ip, None), ok, "{ip}");
        }
        let deny_only: IpRestriction = build("deny: [203.0.113.0/24]").unwrap();
        assert!(verdict(&deny_only, "198.51.100.1", None));
        assert!(!verdict(&deny_only, "203.0.113.9", None));
        let mut req = request("GET", "/", &[]);
        let Flow::Respond(r) = p.request(&mut req, &mut ctx()) else {
            panic!("an unknown client is refused when `allow` is given");
        };
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn test_trusted_proxies_walk_forwarded_for_from_the_right() {
        let p: IpRestriction =
            build("allow: [198.51.100.0/24]\ntrusted_proxies: [10.0.0.0/8]\n").unwrap();
        // Peer is a trusted proxy; the hop before it is the client.
        assert!(verdict(
            &p,
            "10.0.0.2",
            Some("6.6.6.6, 198.51.100.4, 10.0.0.9")
        ));
        // A spoofed left-most entry does not help a client outside.
        assert!(!verdict(&p, "10.0.0.2", Some("198.51.100.4, 6.6.6.6")));
        // An untrusted peer's header is ignored.
        assert!(!verdict(&p, "6.6.6.6", Some("198.51.100.4")));
    }

    #[test]
    fn test_bad_config_is_refused() {
        for (yaml, needle) in [
            ("{}", "give `allow`, `deny`"),
            ("allow: [10.0.0.0/33]", "allow[0]"),
            ("deny: [1.2.3.4, nope]", "deny[1]: `nope`"),
            ("deny: [1.2.3.4]\nstatus: 200", "status: 200"),
            ("alow: [1.2.3.4]", "unknown field `alow`"),
        ] {
            let e = build::<IpRestriction>(yaml).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }
}
