//! PostgreSQL over TLS against the local server, which answers TLS with its own self-signed certificate
//! (`ssl_cert_file`, CN and SAN `localhost`). `sslmode=verify-full` passes with that certificate as the CA and
//! fails with another; `pg_stat_ssl` shows the store's connections encrypted.

use heap_relay::store::PgStore;
use heap_relay::store::postgres::PgOptions;

/// The local server's certificate, which is also its own CA.
const SERVER_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn base() -> String {
    std::env::var("HEAP_RELAY_TEST_PG_TLS").unwrap_or_else(|_| "postgres://postgres@localhost:5432/test".into())
}

/// A fresh schema, dropped at the end of the test.
struct Schema(String);

async fn plain() -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/test", tokio_postgres::NoTls).await.expect(
            "PostgreSQL at 127.0.0.1:5432 (start it with `pg_ctlcluster --skip-systemctl-redirect $(ls \
             /etc/postgresql) main start`)",
        );
    tokio::spawn(conn);
    client
}

impl Schema {
    async fn create() -> Self {
        let name = format!("tls_{}", uuid::Uuid::now_v7().simple());
        plain().await.batch_execute(&format!("CREATE SCHEMA {name}")).await.expect("create schema");
        Self(name)
    }

    fn url(&self, params: &str) -> String {
        format!("{}?options=-csearch_path%3D{}&application_name={}&{params}", base(), self.0, self.0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.0.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async { plain().await.batch_execute(&format!("DROP SCHEMA {name} CASCADE")).await.ok() });
        })
        .join()
        .ok();
    }
}

fn options() -> PgOptions {
    PgOptions { max_bytes: 0, pool_size: 2, dedupe_window_ms: 0 }
}

#[tokio::test]
async fn verify_full_with_the_servers_ca_connects_and_pg_stat_ssl_shows_the_connections_encrypted() {
    let schema = Schema::create().await;
    let url = schema.url(&format!("sslmode=verify-full&sslrootcert={SERVER_CERT}"));
    let store = PgStore::open(&url, options()).await.expect("verify-full with the server's CA connects");
    let rows = plain()
        .await
        .query(
            "SELECT s.ssl, coalesce(s.version, '') FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
            &[&schema.0],
        )
        .await
        .expect("pg_stat_ssl");
    assert!(!rows.is_empty(), "the store holds connections");
    for r in &rows {
        let (ssl, version): (bool, String) = (r.get(0), r.get(1));
        assert!(ssl, "every connection of the store is encrypted ({version})");
        assert!(version.starts_with("TLSv1."), "{version}");
    }
    drop(store);
}

#[tokio::test]
async fn verify_full_with_a_wrong_ca_or_a_wrong_host_name_is_refused_and_require_still_encrypts() {
    let schema = Schema::create().await;
    // Any other CA: a public root that never signed the local certificate.
    let wrong = std::fs::read_dir("/etc/ssl/certs")
        .expect("/etc/ssl/certs")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "pem") && !p.ends_with("ssl-cert-snakeoil.pem"))
        .expect("another CA certificate");
    let url = schema.url(&format!("sslmode=verify-full&sslrootcert={}", wrong.display()));
    let Err(err) = PgStore::open(&url, options()).await else { panic!("a wrong CA is refused") };
    assert!(!err.to_string().is_empty());
    // The right CA but an address the certificate does not name: verify-full refuses, verify-ca accepts.
    let by_ip = |mode: &str| {
        schema.url(&format!("sslmode={mode}&sslrootcert={SERVER_CERT}")).replacen("@localhost:", "@127.0.0.1:", 1)
    };
    assert!(PgStore::open(&by_ip("verify-full"), options()).await.is_err(), "the name must match");
    PgStore::open(&by_ip("verify-ca"), options()).await.expect("verify-ca does not compare the name");
    PgStore::open(&schema.url("sslmode=require"), options()).await.expect("require: encrypted, not verified");
}
