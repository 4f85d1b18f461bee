//! Application probes: HTTP GET of configured endpoints, each with a timeout and an expected
//! status. A probe that times out, cannot connect or answers another status has failed.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use super::score::ProbeResult;

/// One configured probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub name: String,
    /// `http://host:port/path` (plain HTTP).
    pub url: String,
    pub timeout: Duration,
    pub expect_status: u16,
}

impl ProbeSpec {
    /// Parses `URL[,timeout=2s][,status=200]`.
    pub fn parse(s: &str) -> Result<ProbeSpec, String> {
        let mut parts = s.split(',');
        let url = parts.next().unwrap_or_default().to_string();
        let uri: hyper::Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("`{url}`: only http:// probes are supported"));
        }
        let mut spec =
            ProbeSpec { name: url.clone(), url, timeout: Duration::from_secs(2), expect_status: 200 };
        for p in parts {
            match p.split_once('=') {
                Some(("timeout", v)) => spec.timeout = crate::parse_duration(v)?,
                Some(("status", v)) => {
                    spec.expect_status = v.parse().map_err(|_| format!("status `{v}` is not a number"))?;
                }
                _ => return Err(format!("`{p}`: expected timeout=DURATION or status=CODE")),
            }
        }
        Ok(spec)
    }
}

/// Runs probes.
#[derive(Debug, Clone)]
pub struct Prober {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
}

impl Default for Prober {
    fn default() -> Self {
        Prober { client: Client::builder(TokioExecutor::new()).build_http() }
    }
}

impl Prober {
    /// Probes one endpoint; the reason of a failure is logged at debug level.
    pub async fn probe(&self, spec: &ProbeSpec) -> ProbeResult {
        let ok = match spec.url.parse::<hyper::Uri>() {
            Ok(uri) => match tokio::time::timeout(spec.timeout, async {
                let resp = self.client.get(uri).await?;
                let status = resp.status().as_u16();
                // Read the body so the connection can be reused.
                let _ = resp.into_body().collect().await;
                Ok::<u16, hyper_util::client::legacy::Error>(status)
            })
            .await
            {
                Ok(Ok(status)) => {
                    if status != spec.expect_status {
                        tracing::debug!(probe = %spec.name, status, expected = spec.expect_status, "probe failed: status");
                    }
                    status == spec.expect_status
                }
                Ok(Err(e)) => {
                    tracing::debug!(probe = %spec.name, "probe failed: {e}");
                    false
                }
                Err(_) => {
                    tracing::debug!(probe = %spec.name, timeout = ?spec.timeout, "probe failed: timeout");
                    false
                }
            },
            Err(_) => false,
        };
        ProbeResult { name: spec.name.clone(), ok }
    }

    /// Probes all endpoints concurrently; results in the order of `specs`.
    pub async fn probe_all(&self, specs: &[ProbeSpec]) -> Vec<ProbeResult> {
        let mut set = tokio::task::JoinSet::new();
        for (i, spec) in specs.iter().cloned().enumerate() {
            let me = self.clone();
            set.spawn(async move { (i, me.probe(&spec).await) });
        }
        let mut out: Vec<Option<ProbeResult>> = vec![None; specs.len()];
        while let Some(r) = set.join_next().await {
            if let Ok((i, res)) = r {
                out[i] = Some(res);
            }
        }
        out.into_iter()
            .zip(specs)
            .map(|(r, s)| r.unwrap_or(ProbeResult { name: s.name.clone(), ok: false }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A tiny HTTP server answering every request with `status` after `delay`.
    async fn server(status: u16, delay: Duration) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                            )
                            .as_bytes(),
                        )
                        .await;
                });
            }
        });
        format!("http://{addr}/health")
    }

    #[tokio::test]
    async fn probes_pass_fail_and_time_out() {
        let p = Prober::default();
        let ok = ProbeSpec::parse(&server(200, Duration::ZERO).await).unwrap();
        assert!(p.probe(&ok).await.ok);
        let bad = ProbeSpec::parse(&server(503, Duration::ZERO).await).unwrap();
        assert!(!p.probe(&bad).await.ok);
        let want503 = ProbeSpec::parse(&format!("{},status=503", bad.url)).unwrap();
        assert!(p.probe(&want503).await.ok);
        let slow = ProbeSpec::parse(&format!("{},timeout=100ms", server(200, Duration::from_secs(2)).await))
            .unwrap();
        assert!(!p.probe(&slow).await.ok);
        let closed = ProbeSpec::parse("http://127.0.0.1:1/x,timeout=500ms").unwrap();
        assert!(!p.probe(&closed).await.ok);
        assert_eq!(p.probe_all(&[ok, closed]).await.iter().map(|r| r.ok).collect::<Vec<_>>(), [true, false]);
    }

    #[test]
    fn specs_parse_with_clear_errors() {
        let s = ProbeSpec::parse("http://app:8080/healthz,timeout=500ms,status=204").unwrap();
        assert_eq!((s.timeout, s.expect_status), (Duration::from_millis(500), 204));
        assert!(ProbeSpec::parse("https://x/").unwrap_err().contains("http://"));
        assert!(ProbeSpec::parse("http://x/,retries=3").unwrap_err().contains("retries"));
    }
}
