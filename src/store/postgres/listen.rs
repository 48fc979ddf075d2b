//! LISTEN/NOTIFY wake-ups: appends on any instance wake the idle delivery workers of every instance.

use super::PgStore;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

impl PgStore {
    /// LISTENs on this schema's channel on a connection of its own and calls `on_append` for every notification
    /// (events appended by any instance, or requeued). Reconnects after a lost connection; the workers' poll
    /// interval covers the gap.
    pub fn spawn_listener(&self, on_append: impl Fn() + Send + Sync + 'static) -> tokio::task::JoinHandle<()> {
        let config = self.config.clone();
        let tls = self.tls.clone();
        let channel = self.channel.clone();
        tokio::spawn(async move {
            loop {
                match listen(&config, &tls, &channel, &on_append).await {
                    Ok(()) => tracing::warn!("the LISTEN connection to PostgreSQL closed; reconnecting"),
                    Err(e) => tracing::warn!(error = %e, "the LISTEN connection to PostgreSQL failed; reconnecting"),
                }
                // Whatever arrived meanwhile: let the workers look.
                on_append();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }
}

async fn listen(
    config: &tokio_postgres::Config,
    tls: &super::tls::MakeRustls,
    channel: &str,
    on_append: &(impl Fn() + Send + Sync),
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls.clone()).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL LISTEN connection error");
                    break;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\""))).await?;
    while rx.recv().await.is_some() {
        on_append();
    }
    driver.abort();
    Ok(())
}
