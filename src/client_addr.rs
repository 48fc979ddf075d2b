//! Who the client is, for logs and auth-failure reports. Behind a TLS proxy every connection comes from the proxy,
//! so `X-Forwarded-For` names the client; but anyone can send that header, so it is believed only from the
//! proxies listed in `server.trusted_proxies`. The client is the right-most address in the chain that is not a
//! trusted proxy (addresses to its left were written by the client itself and prove nothing).

use ipnet::IpNet;
use std::net::IpAddr;

/// An address (`10.0.0.1`, a one-address range) or a CIDR range (`10.0.0.0/8`).
pub fn parse_range(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    ranges: Vec<IpNet>,
}

impl TrustedProxies {
    /// Ranges that do not parse are left out (settings validation refuses them first).
    pub fn new(ranges: &[String]) -> Self {
        Self { ranges: ranges.iter().filter_map(|r| parse_range(r)).collect() }
    }

    /// Whether `ip` is one of the trusted proxies (whose X-Forwarded-* headers count).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted(ip)
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.ranges.iter().any(|r| r.contains(&ip))
    }

    /// The client's address: the peer's own, unless the peer is a trusted proxy; then the right-most address of
    /// `forwarded_for` (every X-Forwarded-For header value, in order) that is not a trusted proxy.
    pub fn client(&self, peer: Option<IpAddr>, forwarded_for: &[&str]) -> Option<IpAddr> {
        let peer = peer.map(canonical)?;
        if !self.trusted(peer) {
            return Some(peer);
        }
        let chain: Vec<IpAddr> = forwarded_for
            .iter()
            .flat_map(|v| v.split(','))
            .filter_map(|a| parse_forwarded_addr(a.trim()))
            .map(canonical)
            .collect();
        let mut client = peer;
        for ip in chain.iter().rev() {
            client = *ip;
            if !self.trusted(*ip) {
                break;
            }
        }
        Some(client)
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `[::1]:5678` or `::1`.
fn parse_forwarded_addr(a: &str) -> Option<IpAddr> {
    if let Ok(ip) = a.parse::<IpAddr>() {
        return Some(ip);
    }
    a.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let p = TrustedProxies::new(&["10.0.0.0/8".into()]);
        assert_eq!(p.client(ip("203.0.113.9"), &["1.1.1.1"]), ip("203.0.113.9"));
        assert_eq!(TrustedProxies::default().client(ip("127.0.0.1"), &["1.1.1.1"]), ip("127.0.0.1"));
    }

    #[test]
    fn from_a_trusted_proxy_the_rightmost_untrusted_address_is_the_client() {
        let p = TrustedProxies::new(&["10.0.0.0/8".into(), "192.0.2.7".into()]);
        assert_eq!(p.client(ip("10.1.2.3"), &["6.6.6.6, 198.51.100.4, 192.0.2.7"]), ip("198.51.100.4"));
        assert_eq!(p.client(ip("::ffff:10.1.2.3"), &["6.6.6.6", "198.51.100.4:443"]), ip("198.51.100.4"));
        assert_eq!(p.client(ip("10.1.2.3"), &["garbage"]), ip("10.1.2.3"));
        assert_eq!(p.client(ip("10.1.2.3"), &["10.9.9.9"]), ip("10.9.9.9"));
    }
}
