//! TLS on both listeners of a real coordinator (gRPC and `/metrics`) over
//! loopback sockets, with certificates made by the `openssl` command line:
//! a trusted CA, a server certificate for 127.0.0.1/localhost, a client
//! certificate, and a second "rogue" CA the server does not trust.
//!
//! - TLS: a client that trusts the CA submits and reads a job; a plaintext
//!   client and a client trusting another CA get nothing.
//! - Mutual TLS: only a client presenting a certificate of the trusted
//!   client CA gets through, on gRPC and on `/metrics` alike.
//! - A missing or mismatched file is refused before anything binds, naming
//!   the file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use distill_coordinator::sim::SimClient;
use distill_coordinator::store::EmbeddedStore;
use distill_coordinator::testing::{wait_for, Served};
use distill_coordinator::tls::{ClientTlsFiles, ServerTlsFiles};
use distill_coordinator::Config;
use distill_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

const SPEC: &str =
    "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\n";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA `<name>.pem`/`<name>.key`.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A leaf `<name>.pem`/`<name>.key` signed by CA `by`, with `ext` lines.
fn leaf(dir: &Path, name: &str, by: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{by}.pem"),
            "-CAkey",
            &format!("{by}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ca(d, "ca");
        ca(d, "rogue");
        leaf(
            d,
            "server",
            "ca",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n");
        leaf(d, "intruder", "rogue", "extendedKeyUsage=clientAuth\n");
        Self { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn server(&self, mutual: bool) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: mutual.then(|| self.path("ca.pem")),
        }
    }

    /// A client trusting `ca`, presenting `identity` (a leaf name).
    fn client(&self, ca: &str, identity: Option<&str>) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.path(&format!("{ca}.pem")),
            identity: identity.map(|n| {
                (
                    self.path(&format!("{n}.pem")),
                    self.path(&format!("{n}.key")),
                )
            }),
            domain: None,
        }
    }
}

struct Running {
    grpc: String,
    metrics: std::net::SocketAddr,
    served: Served,
    _state: tempfile::TempDir,
}

async fn start(tls: &ServerTlsFiles) -> Running {
    let state = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(state.path()).unwrap();
    let config = Config {
        tls: Some(tls.load().unwrap()),
        ..Config::default()
    };
    let served = Served::start(store, config, true).await.unwrap();
    Running {
        grpc: format!("https://{}", served.addr),
        metrics: served.metrics.unwrap(),
        served,
        _state: state,
    }
}

impl Running {
    /// Until the coordinator answers a `tls` client (it leads).
    async fn wait_leading(&self, tls: &ClientTlsFiles) {
        wait_for(
            Duration::from_secs(20),
            "the coordinator to lead",
            || async { list(&self.grpc, Some(tls)).await.ok() },
        )
        .await
        .unwrap();
    }

    async fn shutdown(self) {
        self.served.stop().await.unwrap();
    }
}

/// One `ListJobs` over a fresh connection, with `tls` (or plaintext).
async fn list(url: &str, tls: Option<&ClientTlsFiles>) -> Result<usize, String> {
    let mut ep = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(t) = tls {
        ep = ep.tls_config(t.load().unwrap()).unwrap();
    }
    let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    JobServiceClient::new(ch)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .map(|r| r.into_inner().jobs.len())
        .map_err(|s| format!("{s:?}"))
}

/// `GET /metrics` over TLS; `Err` when the handshake or read fails.
async fn scrape(
    addr: std::net::SocketAddr,
    pki: &Pki,
    identity: Option<&str>,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.path("ca.pem")).unwrap();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(n) => {
            let cert = std::fs::read(pki.path(&format!("{n}.pem"))).unwrap();
            let key = std::fs::read(pki.path(&format!("{n}.key"))).unwrap();
            let chain = rustls_pki_types::CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let io = async {
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut body = String::new();
        tls.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    match tokio::time::timeout(Duration::from_secs(5), io).await {
        Ok(Ok(body)) if body.starts_with("HTTP/1.1 200") => Ok(body),
        Ok(Ok(body)) => Err(format!("unexpected reply: {body:.80}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_serves_trusting_clients_and_refuses_the_rest() {
    let pki = Pki::new();
    let c = start(&pki.server(false)).await;
    c.wait_leading(&pki.client("ca", None)).await;

    // A client trusting the CA: a real submit and read back.
    let mut client =
        SimClient::new(vec![c.grpc.clone()]).with_tls(pki.client("ca", None).load().unwrap());
    let job = client.submit(SPEC, 0).await.unwrap();
    assert_eq!(client.get(&job.job_id).await.unwrap().job_id, job.job_id);
    assert_eq!(list(&c.grpc, Some(&pki.client("ca", None))).await, Ok(1));

    // Plaintext to the TLS port, and a client that trusts another CA.
    let plain = list(&c.grpc.replace("https", "http"), None).await;
    assert!(plain.is_err(), "plaintext call answered: {plain:?}");
    let wrong = list(&c.grpc, Some(&pki.client("rogue", None))).await;
    assert!(
        wrong.is_err(),
        "untrusted server certificate accepted: {wrong:?}"
    );

    // Metrics over HTTPS; the job just submitted is counted.
    let body = scrape(c.metrics, &pki, None).await.unwrap();
    let jobs: u64 = body
        .lines()
        .filter(|l| l.starts_with("distill_jobs{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(jobs, 1, "{body}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_requires_a_client_certificate_of_the_trusted_ca() {
    let pki = Pki::new();
    let c = start(&pki.server(true)).await;
    c.wait_leading(&pki.client("ca", Some("client"))).await;

    assert_eq!(
        list(&c.grpc, Some(&pki.client("ca", Some("client")))).await,
        Ok(0)
    );
    let anonymous = list(&c.grpc, Some(&pki.client("ca", None))).await;
    assert!(
        anonymous.is_err(),
        "no client certificate, yet answered: {anonymous:?}"
    );
    let intruder = list(&c.grpc, Some(&pki.client("ca", Some("intruder")))).await;
    assert!(
        intruder.is_err(),
        "rogue client certificate accepted: {intruder:?}"
    );

    assert!(scrape(c.metrics, &pki, Some("client")).await.is_ok());
    let anon = scrape(c.metrics, &pki, None).await;
    assert!(
        anon.is_err(),
        "metrics without a client certificate: {anon:?}"
    );
    let rogue = scrape(c.metrics, &pki, Some("intruder")).await;
    assert!(
        rogue.is_err(),
        "metrics with a rogue client certificate: {rogue:?}"
    );
    c.shutdown().await;
}

#[test]
fn bad_tls_files_are_refused_naming_the_file() {
    let pki = Pki::new();
    let missing = ServerTlsFiles {
        cert: pki.path("nope.pem"),
        ..pki.server(false)
    };
    let e = missing.load().unwrap_err().to_string();
    assert!(e.contains("nope.pem") && e.contains("cannot read"), "{e}");

    // A key file in the certificate's place.
    let swapped = ServerTlsFiles {
        cert: pki.path("server.key"),
        ..pki.server(false)
    };
    let e = swapped.load().unwrap_err().to_string();
    assert!(
        e.contains("server.key") && e.contains("no CERTIFICATE"),
        "{e}"
    );

    // The client's key with the server's certificate.
    let mismatched = ServerTlsFiles {
        key: pki.path("client.key"),
        ..pki.server(false)
    };
    let e = mismatched.load().unwrap_err().to_string();
    assert!(
        e.contains("client.key") && e.contains("does not match"),
        "{e}"
    );

    let e = pki.client("nope", None).load().unwrap_err().to_string();
    assert!(e.contains("nope.pem"), "{e}");
}
