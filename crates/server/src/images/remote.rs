//! Remote images: `http(s)` image URLs fetched when `server.allow_remote_images` is on. Every hop is checked
//! before it is made: the host's addresses are resolved here and must all be public (not loopback, private,
//! link-local, shared, multicast, reserved...; IPv4 inside IPv6 judged as IPv4), the connection goes to
//! exactly those addresses (no second lookup a rebinding DNS server could answer differently, no proxy from
//! the environment), and redirects are followed by hand, at most [`MAX_REDIRECTS`], each target checked the
//! same way. `server.allow_private_image_hosts` lets the URL as given (not a redirect's target) name a host
//! on this machine or its network. The body is read in pieces and dropped as soon as it passes the byte cap
//! (a `Content-Length` over it is refused before reading); all of a request's remote images share one
//! deadline (`server.remote_image_timeout_seconds`). Bodies are not decompressed.

use reqwest::{header, redirect, Url};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::time::Instant;

/// Most redirects followed for one image.
pub const MAX_REDIRECTS: usize = 3;

fn late() -> String {
    "the image did not arrive in time (server.remote_image_timeout_seconds)".into()
}

/// Whether `ip` is an address on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => public_v4(a),
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return public_v4(v4);
            }
            let s = a.segments();
            // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return public_v4(Ipv4Addr::from(u128::from(a) as u32));
            }
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || s[..6] == [0; 6] // IPv4-compatible (deprecated) and the rest of ::/96
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] < 0x0200)) // IETF protocol assignments (Teredo, benchmarking...)
        }
    }
}

fn public_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    !(a.is_private()
        || a.is_loopback()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space (carrier-grade NAT)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking
        || o[0] >= 240) // reserved
}

/// How remote images may be fetched.
#[derive(Clone, Copy, Debug)]
pub struct RemotePolicy {
    pub max_bytes: usize,
    /// The URL as given (not a redirect's target) may name a non-public address.
    pub allow_private: bool,
}

/// The addresses `url`'s host stands for, each checked: all public unless `private_ok`.
async fn addresses(url: &Url, private_ok: bool) -> Result<Vec<SocketAddr>, String> {
    let port = url.port_or_known_default().ok_or("the URL has no port")?;
    let addrs: Vec<SocketAddr> = match url.host() {
        None => return Err("the URL has no host".into()),
        Some(url::Host::Ipv4(a)) => vec![SocketAddr::new(a.into(), port)],
        Some(url::Host::Ipv6(a)) => vec![SocketAddr::new(a.into(), port)],
        Some(url::Host::Domain(d)) => tokio::net::lookup_host((d, port))
            .await
            .map_err(|e| format!("the host {d} could not be resolved ({e})"))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err("the host has no addresses".into());
    }
    if !private_ok {
        if let Some(a) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(format!(
                "the host is a loopback, private or otherwise non-public address ({}); not fetched",
                a.ip()
            ));
        }
    }
    Ok(addrs)
}

/// One request to `url` (no redirects followed), connecting only to its checked addresses.
async fn get(url: &Url, private_ok: bool, left: Duration) -> Result<reqwest::Response, String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{}: URLs are not fetched here (http and https only)", url.scheme()));
    }
    let addrs = addresses(url, private_ok).await?;
    let mut client = reqwest::Client::builder()
        .redirect(redirect::Policy::none())
        .no_proxy()
        .timeout(left)
        .user_agent(concat!("mlx-serving/", env!("CARGO_PKG_VERSION")));
    if let Some(url::Host::Domain(d)) = url.host() {
        client = client.resolve_to_addrs(d, &addrs);
    }
    let client = client.build().map_err(|e| format!("no HTTP client ({e})"))?;
    client.get(url.clone()).header(header::ACCEPT, "image/*").send().await.map_err(|e| {
        if e.is_timeout() {
            late()
        } else {
            format!("the request failed ({})", e.without_url())
        }
    })
}

/// The body behind `url`, fetched by `policy` before `deadline`.
pub async fn fetch(url: &str, policy: RemotePolicy, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut url = Url::parse(url).map_err(|e| format!("not a valid URL ({e})"))?;
    for hop in 0..=MAX_REDIRECTS {
        let left = deadline.saturating_duration_since(Instant::now());
        let private_ok = hop == 0 && policy.allow_private;
        let mut resp = tokio::time::timeout_at(deadline, get(&url, private_ok, left)).await.map_err(|_| late())??;
        let status = resp.status();
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| format!("a redirect ({status}) without a Location"))?;
            url = url.join(to).map_err(|e| format!("a redirect to a bad URL ({e})"))?;
            continue;
        }
        if !status.is_success() {
            return Err(format!("the image URL answered {status}"));
        }
        let over = |n: u64| format!("the image is over the limit of {} bytes ({n} or more)", policy.max_bytes);
        if let Some(n) = resp.content_length().filter(|&n| n > policy.max_bytes as u64) {
            return Err(over(n));
        }
        let mut body = Vec::new();
        loop {
            let piece = tokio::time::timeout_at(deadline, resp.chunk()).await.map_err(|_| late())?;
            let piece = piece.map_err(|e| match e.is_timeout() {
                true => late(),
                false => format!("the image's body broke off ({})", e.without_url()),
            })?;
            match piece {
                None => return Ok(body),
                Some(p) if body.len() + p.len() > policy.max_bytes => return Err(over((body.len() + p.len()) as u64)),
                Some(p) => body.extend_from_slice(&p),
            }
        }
    }
    Err(format!("more than {MAX_REDIRECTS} redirects"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn public_and_private_addresses() {
        for a in
            ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8", "64:ff9b::808:808"]
        {
            assert!(is_public(a.parse().unwrap()), "{a} is public");
        }
        for a in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254", // cloud metadata
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "2001::1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a} is not public");
        }
    }

    /// A one-connection-at-a-time HTTP server on loopback that answers every request with `reply(path)`.
    async fn serve(reply: fn(&str, u16) -> Vec<u8>, stall: bool) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut head = vec![0u8; 4096];
                let n = s.read(&mut head).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&head[..n]).to_string();
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let out = reply(&path, port);
                tokio::spawn(async move {
                    // Stalling: everything but the last 100 bytes, then nothing for a long time.
                    let (first, rest) = out.split_at(if stall { out.len() - 100 } else { out.len() });
                    let _ = s.write_all(first).await;
                    if stall {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    let _ = s.write_all(rest).await;
                });
            }
        });
        port
    }

    fn reply(path: &str, port: u16) -> Vec<u8> {
        let ok = |body: &[u8], len: bool| {
            let mut r = b"HTTP/1.1 200 OK\r\nconnection: close\r\n".to_vec();
            if len {
                r.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            r.extend_from_slice(body);
            r
        };
        let to =
            |loc: String| format!("HTTP/1.1 302 Found\r\nlocation: {loc}\r\ncontent-length: 0\r\n\r\n").into_bytes();
        match path {
            "/img" => ok(b"pretend image bytes", true),
            "/big" => ok(&[7u8; 5000], true),
            "/big-unsized" => ok(&[7u8; 5000], false),
            "/to-loopback" => to(format!("http://127.0.0.1:{port}/img")),
            "/to-localhost" => to(format!("http://localhost:{port}/img")),
            "/loop" => to("/loop".into()),
            "/ftp" => to("ftp://example.com/x.png".into()),
            _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(),
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn fetches_within_the_policy() {
        let port = serve(reply, false).await;
        let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
        let open = RemotePolicy { max_bytes: 1000, allow_private: true };
        assert_eq!(fetch(&url("/img"), open, soon()).await.unwrap(), b"pretend image bytes");
        // Loopback is refused unless the URL as given is allowed to be private...
        let closed = RemotePolicy { allow_private: false, ..open };
        let e = fetch(&url("/img"), closed, soon()).await.unwrap_err();
        assert!(e.contains("non-public") && e.contains("127.0.0.1"), "{e}");
        let e = fetch(&format!("http://localhost:{port}/img"), closed, soon()).await.unwrap_err();
        assert!(e.contains("non-public"), "a name that resolves to loopback: {e}");
        // ...and a redirect's target never may be.
        for p in ["/to-loopback", "/to-localhost"] {
            let e = fetch(&url(p), open, soon()).await.unwrap_err();
            assert!(e.contains("non-public"), "{p}: {e}");
        }
        // A redirect loop on loopback ends at its first hop's check (the limit of MAX_REDIRECTS hops needs
        // public addresses to be seen).
        let e = fetch(&url("/loop"), open, soon()).await.unwrap_err();
        assert!(e.contains("non-public"), "{e}");
        let e = fetch(&url("/ftp"), open, soon()).await.unwrap_err();
        assert!(e.contains("http and https only"), "{e}");
        let e = fetch(&url("/missing"), open, soon()).await.unwrap_err();
        assert!(e.contains("404"), "{e}");
        // Over the byte cap: by its Content-Length, and without one while reading.
        for p in ["/big", "/big-unsized"] {
            let e = fetch(&url(p), open, soon()).await.unwrap_err();
            assert!(e.contains("over the limit of 1000 bytes"), "{p}: {e}");
        }
        assert_eq!(
            fetch(&url("/big-unsized"), RemotePolicy { max_bytes: 5000, ..open }, soon()).await.unwrap().len(),
            5000
        );
        for bad in ["http://", "not a url", "file:///etc/passwd"] {
            assert!(fetch(bad, open, soon()).await.is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_stalled_body_runs_into_the_deadline() {
        let port = serve(reply, true).await;
        let open = RemotePolicy { max_bytes: 100_000, allow_private: true };
        let t = std::time::Instant::now();
        let deadline = Instant::now() + Duration::from_millis(400);
        let e = fetch(&format!("http://127.0.0.1:{port}/big"), open, deadline).await.unwrap_err();
        assert!(e.contains("in time"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "stopped at the deadline, not the server's stall");
    }
}
