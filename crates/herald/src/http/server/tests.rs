//! Unit tests of the client IP rule (`HERALD_TRUSTED_PROXIES`) and the connection
//! counts.

use super::*;
use axum::http::HeaderValue;

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter().map(|c| Cidr::parse(c).unwrap()).collect()
}

fn xff(values: &[&str]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for v in values {
        headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
    }
    headers
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
    let trusted = cidrs(&["10.0.0.0/8"]);
    assert_eq!(
        client_ip(ip("203.0.113.9"), &xff(&["1.2.3.4"]), &trusted),
        ip("203.0.113.9")
    );
    assert_eq!(client_ip(ip("10.0.0.1"), &xff(&["1.2.3.4"]), &[]), ip("10.0.0.1"));
}

#[test]
fn behind_trusted_proxies_the_rightmost_untrusted_address_is_the_client() {
    let trusted = cidrs(&["10.0.0.0/8", "192.168.1.7"]);
    // The client spoofed 6.6.6.6 at the left; the proxy appended what it saw.
    let headers = xff(&["6.6.6.6, 1.2.3.4", "192.168.1.7"]);
    assert_eq!(client_ip(ip("10.1.2.3"), &headers, &trusted), ip("1.2.3.4"));
    // No header: the proxy itself.
    assert_eq!(
        client_ip(ip("10.1.2.3"), &HeaderMap::new(), &trusted),
        ip("10.1.2.3")
    );
    // Every hop trusted: the leftmost one.
    assert_eq!(
        client_ip(ip("10.1.2.3"), &xff(&["10.9.9.9"]), &trusted),
        ip("10.9.9.9")
    );
    // Garbage stops the walk at the last good address.
    assert_eq!(
        client_ip(ip("10.1.2.3"), &xff(&["1.1.1.1, garbage, 10.2.2.2"]), &trusted),
        ip("10.2.2.2")
    );
    // Ports and IPv6.
    assert_eq!(
        client_ip(ip("10.1.2.3"), &xff(&["[2001:db8::1]:443"]), &trusted),
        ip("2001:db8::1")
    );
    assert_eq!(
        client_ip(ip("10.1.2.3"), &xff(&["5.6.7.8:1234"]), &trusted),
        ip("5.6.7.8")
    );
    // An IPv4-mapped peer counts as IPv4.
    assert_eq!(
        client_ip(ip("::ffff:10.1.2.3"), &xff(&["5.6.7.8"]), &trusted),
        ip("5.6.7.8")
    );
}

#[test]
fn cidr_parsing_and_matching() {
    let block = Cidr::parse("10.0.0.0/8").unwrap();
    assert!(block.contains(ip("10.255.0.1")));
    assert!(!block.contains(ip("11.0.0.1")));
    assert!(!block.contains(ip("::1")));
    assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
    assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
    assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
    for bad in ["10.0.0.0/33", "nonsense", "::/129", "1.2.3.4/x", ""] {
        assert!(Cidr::parse(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn pending_slots_are_per_ip_and_freed_on_drop() {
    let load = Arc::new(Load::new(10, 2));
    let a = ip("127.0.0.1");
    let first = load.try_pending(a);
    let second = load.try_pending(a);
    assert!(first.is_some() && second.is_some());
    assert!(load.try_pending(a).is_none());
    assert!(load.try_pending(ip("127.0.0.2")).is_some());
    drop(first);
    assert!(load.try_pending(a).is_some());
}

#[test]
fn the_ceiling_counts_open_connections() {
    let load = Arc::new(Load::new(2, 64));
    let one = load.opened();
    let two = load.opened();
    assert!(!load.over_ceiling());
    let three = load.opened();
    assert!(load.over_ceiling());
    drop((one, two, three));
    assert_eq!(load.open(), 0);
}

#[test]
fn the_default_ceiling_keeps_a_reserve() {
    let limit = fd_limit();
    let max = default_max_connections();
    assert!(max < limit || limit <= 64, "{max} of {limit}");
    assert!(limit - max >= 64.min(limit - 1));
}
