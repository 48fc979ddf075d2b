//! Builds the application from settings: templates, store, delivery workers, background tasks and the HTTP
//! server on a bound listener. Tests and `main` share this path; tests bind port 0 and read `port()`.

use crate::auth::{Verifier, WriteKeys};
use crate::client_addr::TrustedProxies;
use crate::delivery::heap_client::HeapClient;
use crate::delivery::rate_limit::RateLimiter;
use crate::delivery::{Delivery, DeliveryConfig, Worker};
use crate::domain::{AppId, AppIdPolicy, IdentityPolicy, PropertyLimits};
use crate::exposure;
use crate::ingest::{Pipeline, SourceConfig};
use crate::intake::Intaker;
use crate::json::JsonLimits;
use crate::metrics::Metrics;
use crate::request_rate::RequestRate;
use crate::routes::body::InflightBytes;
use crate::routes::gate::AuthFailureLog;
use crate::routes::gate::Gate;
use crate::routes::origin::AllowedOrigins;
use crate::routes::span::RelayRootSpan;
use crate::routes::{self, AppState};
use crate::settings::{DEFAULT_ENVIRONMENT_KEY, Settings};
use crate::sources::{Source, SourceOptions};
use crate::store::postgres::{self, PgOptions};
use crate::store::sqlite::SqliteOptions;
use crate::store::{PgStore, SqliteStore, Store, now_ms};
use crate::templates::TemplateStore;
use crate::templates::bounds::LoadLimits;
use crate::templates::render::RenderLimits;
use actix_web::middleware::TrailingSlash;
use actix_web::{App, HttpServer, web};
use anyhow::{Context, anyhow};
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Loads the template directory. A template that does not load is logged loudly and does not stop the relay:
/// the others work, and its route answers as `Pipeline::hold_broken_templates` says. Fails only when an enabled
/// source's template file is missing altogether.
pub fn load_templates(settings: &Settings) -> anyhow::Result<Arc<TemplateStore>> {
    let (store, errors) = TemplateStore::open_with(&settings.templates.dir, load_limits(settings));
    for e in &errors {
        tracing::error!(problem = %e, "a template does not load; its route cannot render until the file is fixed");
    }
    for (name, s) in settings.hook_sources() {
        if s.enabled && store.get(name, &s.template).is_none() && store.broken(name, &s.template).is_none() {
            return Err(anyhow!(
                "source {name} is enabled but its template {}/{name}/{}.json is missing",
                settings.templates.dir.display(),
                s.template
            ));
        }
    }
    Ok(Arc::new(store))
}

/// The template load limits as configured.
pub fn load_limits(settings: &Settings) -> LoadLimits {
    LoadLimits {
        max_template_bytes: settings.templates.max_template_bytes,
        max_loop_iterations: settings.templates.max_loop_iterations,
    }
}

/// `prod=1111111111 dev=2222222222` (with the number of write keys each; never the keys), for the start line.
fn environment_list(settings: &Settings) -> String {
    let keys = |env: &str| settings.sources.segment.write_keys.get(env).map_or(0, Vec::len);
    settings
        .environments
        .iter()
        .map(|(name, e)| format!("{name}={} ({} write keys)", e.app_id.trim(), keys(name)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each source's authentication and request budget, for the HTTP handlers.
pub fn build_gates(settings: &Settings) -> anyhow::Result<HashMap<&'static str, Gate>> {
    let rates = [
        settings.sources.clevertap.requests_per_minute,
        settings.sources.userpilot.requests_per_minute,
        settings.sources.segment.requests_per_minute,
        settings.sources.heap.requests_per_minute,
    ];
    settings
        .source_auth()
        .into_iter()
        .zip(rates)
        .map(|((name, auth), per_minute)| {
            let verifier = Verifier::from_settings(name, auth)?;
            let write_keys = match name {
                "segment" => WriteKeys::new(&settings.sources.segment.write_keys, DEFAULT_ENVIRONMENT_KEY),
                _ => WriteKeys::default(),
            };
            Ok((name, Gate { verifier, rate: RequestRate::new(per_minute), write_keys }))
        })
        .collect()
}

/// The ingest pipeline as configured.
pub fn build_pipeline(settings: &Settings, templates: Arc<TemplateStore>) -> Pipeline {
    let allowed: Vec<AppId> = settings.heap.allowed_app_ids.iter().filter_map(|a| AppId::parse(a).ok()).collect();
    let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
    let sources: HashMap<Source, SourceConfig> = Source::ALL
        .into_iter()
        .map(|src| {
            let s = match src {
                Source::CleverTap => &settings.sources.clevertap,
                Source::Userpilot => &settings.sources.userpilot,
                Source::Segment => &settings.sources.segment,
            };
            let cfg = SourceConfig {
                enabled: s.enabled,
                template: s.template.clone(),
                app_id: non_empty(&s.app_id),
                options: SourceOptions { allow_anonymous: s.allow_anonymous, ..SourceOptions::default() },
            };
            (src, cfg)
        })
        .collect();
    // The Heap-compatible routes take the app_id from the body: only configured ones are accepted there.
    let configured: Vec<AppId> = if settings.heap.allowed_app_ids.is_empty() {
        settings.configured_app_ids().into_iter().filter_map(|(_, a)| AppId::parse(a).ok()).collect()
    } else {
        allowed.clone()
    };
    let environments =
        settings.environments.iter().map(|(name, e)| (name.clone(), e.app_id.trim().to_owned())).collect();
    Pipeline {
        environments,
        templates,
        policy: AppIdPolicy::new(allowed),
        heap_compat_policy: AppIdPolicy::only(configured),
        identity_policy: IdentityPolicy::new(
            settings.identity.placeholders.clone(),
            settings.identity.allow_zero_and_minus_one,
            settings.identity.refuse_template_default,
        ),
        default_app_id: non_empty(&settings.heap.app_id),
        limits: PropertyLimits {
            max_count: settings.limits.max_properties,
            max_key_chars: settings.limits.max_property_key_chars,
            max_value_chars: settings.limits.max_property_value_chars,
        },
        render_limits: RenderLimits {
            max_leaf_bytes: settings.templates.max_leaf_bytes,
            max_event_bytes: settings.templates.max_event_bytes,
            timeout: Duration::from_millis(settings.templates.render_timeout_ms.max(1)),
            deadline: None,
        },
        sources,
        heap_compat_enabled: settings.sources.heap.enabled,
        max_items: settings.limits.max_items,
        json_limits: JsonLimits { max_depth: settings.limits.max_json_depth },
        // A broken template's bodies are stored with their items held (202), repaired by a re-render after the fix.
        hold_broken_templates: true,
    }
}

/// Opens the configured store: PostgreSQL when `store.url` is set (connect, migrate), else the SQLite file.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    match settings.store_url() {
        Some(url) => PgStore::open(
            url,
            PgOptions {
                max_bytes: settings.store.max_bytes,
                pool_size: settings.store.pool_size,
                dedupe_window_ms: (settings.store.dedupe_window_secs * 1000) as i64,
            },
        )
        .await
        .map(Store::Postgres)
        .with_context(|| format!("cannot open the PostgreSQL store at {}", postgres::redacted(url))),
        None => SqliteStore::open(
            &settings.store.path,
            SqliteOptions {
                max_bytes: settings.store.max_bytes,
                dedupe_window_ms: (settings.store.dedupe_window_secs * 1000) as i64,
            },
        )
        .map(Store::Sqlite)
        .with_context(|| format!("cannot open the store at {}", settings.store.path.display())),
    }
}

/// Where the store is, for the log (never a password).
fn store_location(settings: &Settings) -> String {
    match settings.store_url() {
        Some(url) => postgres::redacted(url),
        None => settings.store.path.display().to_string(),
    }
}

pub fn delivery_config(settings: &Settings) -> DeliveryConfig {
    let d = &settings.delivery;
    DeliveryConfig {
        max_batch: d.max_batch,
        linger: Duration::from_millis(d.linger_ms),
        poll_interval: Duration::from_millis(d.poll_interval_ms.max(10)),
        lease: Duration::from_secs(d.lease_secs.max(1)),
        max_retry_age: Duration::from_secs(d.max_retry_hours * 3600),
        backoff_base: Duration::from_millis(d.backoff_base_ms.max(1)),
        backoff_max: Duration::from_secs(d.backoff_max_secs.max(1)),
    }
}

pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    state: AppState,
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    grace: Duration,
    /// The second listener for probes (`server.health_bind`), stopped with the main server.
    health: Option<actix_web::dev::ServerHandle>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // First: a refused configuration never opens the store or listens, not even briefly.
        let wanted: std::net::SocketAddr =
            settings.server.bind.parse().with_context(|| format!("server.bind {}", settings.server.bind))?;
        exposure::check_public_bind(&settings, wanted)?;
        let templates = load_templates(&settings)?;
        let store = open_store(&settings).await?;
        let metrics = Arc::new(Metrics::new());
        let clock = crate::clock::Clock::default();
        let client =
            HeapClient::new(&settings.heap.base_url, Duration::from_secs(settings.heap.request_timeout_secs.max(1)))
                .context("cannot build the HTTP client")?
                .with_retry_after_cap(Duration::from_secs(settings.delivery.backoff_max_secs.max(1)));
        let limiter =
            RateLimiter::new(settings.delivery.app_events_per_minute, settings.delivery.identity_events_per_minute);
        let delivery = Arc::new(Delivery::new(
            store.clone(),
            client,
            delivery_config(&settings),
            limiter,
            metrics.clone(),
            clock.clone(),
        ));
        let pipeline = Arc::new(build_pipeline(&settings, templates.clone()));

        if settings.configured_app_ids().is_empty() {
            tracing::warn!(
                "no Heap app_id is configured (heap.app_id or HEAP_RELAY__HEAP__APP_ID): events whose template or body \
                 gives none will be rejected with field app_id"
            );
        }
        let listener = TcpListener::bind(&settings.server.bind)
            .with_context(|| format!("cannot listen on {}", settings.server.bind))?;
        let addr = listener.local_addr()?;
        let gates = Arc::new(build_gates(&settings)?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let workers_running = Arc::new(AtomicUsize::new(0));
        let instance = uuid::Uuid::now_v7().simple().to_string();
        let workers = (0..settings.delivery.workers)
            .map(|i| {
                let worker = Worker::new(delivery.clone(), format!("{instance}-{i}"));
                let rx = shutdown_rx.clone();
                let running = workers_running.clone();
                running.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    worker.run(rx).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        let mut background = Vec::new();
        if settings.templates.reload_interval_secs > 0 {
            background.push(spawn_template_reload(
                templates.clone(),
                Duration::from_secs(settings.templates.reload_interval_secs),
                metrics.clone(),
            ));
        }
        if let Store::Postgres(pg) = &store {
            // Appends on any instance wake this instance's idle workers (LISTEN/NOTIFY), instead of tight polling.
            let d = delivery.clone();
            background.push(pg.spawn_listener(move || {
                d.wake();
            }));
        }
        background.push(spawn_retention(
            store.clone(),
            Duration::from_secs(settings.store.retention_hours * 3600),
            Duration::from_secs(settings.store.refused_retention_hours * 3600),
            settings.store.max_refused_items as i64,
        ));

        let cap = exposure::connection_cap(settings.server.max_connections, exposure::open_file_limit());
        let state = AppState {
            intake: Intaker { pipeline, store, delivery, metrics, clock },
            max_body_bytes: settings.server.max_body_bytes,
            retry_after_secs: settings.store.retry_after_secs,
            admin_token: settings.admin_token().map(|t| crate::auth::digest(t.as_bytes())),
            workers_running,
            gates,
            body_read_timeout: Duration::from_secs(settings.server.body_read_timeout_secs.max(1)),
            inflight: InflightBytes::with_pressure(settings.server.max_inflight_body_bytes, cap.connections / 2),
            origins: Arc::new(AllowedOrigins::new(&settings.server.allowed_origins)),
            proxies: Arc::new(TrustedProxies::new(&settings.server.trusted_proxies)),
            auth_log: Arc::new(AuthFailureLog::new(Duration::from_secs(settings.log.auth_failure_interval_secs))),
            console: crate::console::Console::from_settings(&settings).map(Arc::new),
        };
        let grace = Duration::from_secs(settings.server.shutdown_grace_secs);
        let data = web::Data::new(state.clone());
        let health_listener = match settings.server.health_bind.trim() {
            "" => None,
            bind => Some(TcpListener::bind(bind).with_context(|| format!("cannot listen on {bind}"))?),
        };
        let health_data = data.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::NormalizePath::new(TrailingSlash::MergeOnly))
                .wrap(tracing_actix_web::TracingLogger::<RelayRootSpan>::new())
                .app_data(data.clone())
                .app_data(web::QueryConfig::default().error_handler(routes::query_error))
                .configure(routes::configure)
        })
        .listen(listener)?
        .shutdown_timeout(grace.as_secs())
        .client_request_timeout(Duration::from_secs(settings.server.header_read_timeout_secs.max(1)))
        .client_disconnect_timeout(Duration::from_secs(1));
        let http_workers = if settings.server.workers > 0 {
            settings.server.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        };
        // actix counts connections per worker; split the total so the cap holds for the whole process.
        server = server.workers(http_workers).max_connections(cap.connections.div_ceil(http_workers));
        tracing::info!(
            max_connections = cap.connections,
            open_file_limit = cap.open_files.map_or_else(|| "unknown".into(), |n| n.to_string()),
            "{}",
            cap.why
        );
        let health = match health_listener {
            Some(l) => {
                let health_addr = l.local_addr()?;
                let server = HttpServer::new(move || {
                    App::new().app_data(health_data.clone()).configure(routes::configure_health)
                })
                .listen(l)?
                .workers(1)
                .max_connections(64)
                .client_request_timeout(Duration::from_secs(5))
                .shutdown_timeout(1)
                .disable_signals()
                .run();
                tracing::info!(%health_addr, "health and metrics also served here");
                let handle = server.handle();
                background.push(tokio::spawn(async move {
                    if let Err(e) = server.await {
                        tracing::error!(error = %e, "the health listener stopped");
                    }
                }));
                Some(handle)
            }
            None => None,
        };
        tracing::info!(
            %addr,
            heap = %exposure::redact_url(&settings.heap.base_url),
            store = %store_location(&settings),
            environments = %environment_list(&settings),
            "heap-relay listening"
        );
        Ok(Self { port: addr.port(), server: server.run(), state, shutdown, workers, background, grace, health })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A handle to stop the server (tests; SIGTERM and SIGINT stop it on their own).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped (SIGTERM, SIGINT, or a handle), then lets the delivery workers finish their round and
    /// release their leases, within the grace period.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.server.await?;
        if let Some(h) = &self.health {
            h.stop(true).await;
        }
        tracing::info!("HTTP server stopped; finishing deliveries in flight");
        let _ = self.shutdown.send(true);
        let all = futures_util::future::join_all(self.workers);
        if tokio::time::timeout(self.grace, all).await.is_err() {
            tracing::warn!(
                grace_secs = self.grace.as_secs(),
                "delivery workers did not finish in time; their leases will expire"
            );
        }
        for b in self.background {
            b.abort();
        }
        tracing::info!("heap-relay stopped");
        Ok(())
    }
}

fn spawn_template_reload(templates: Arc<TemplateStore>, every: Duration, metrics: Arc<Metrics>) -> JoinHandle<()> {
    let count = move |result: &str| {
        metrics.template_reloads.get_or_create(&crate::metrics::AttemptLabels { result: result.into() }).inc()
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let t = templates.clone();
            match tokio::task::spawn_blocking(move || t.reload_if_changed()).await {
                Ok(Ok(true)) => {
                    count("ok");
                    tracing::info!("templates reloaded");
                }
                Ok(Ok(false)) => {}
                Ok(Err(errors)) => {
                    count("failed");
                    for e in errors {
                        tracing::error!(problem = %e, "a template does not load after an edit; its last good version (if any) stays in use, the other templates are reloaded");
                    }
                }
                Err(e) => tracing::error!(error = %e, "template reload task failed"),
            }
        }
    })
}

fn spawn_retention(store: Store, keep: Duration, keep_refused: Duration, max_refused: i64) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            let refused_before = now_ms() - keep_refused.as_millis() as i64;
            loop {
                match store.prune_refused(refused_before, max_refused).await {
                    Ok(n) if n > 0 => tracing::info!(deleted = n, "pruned refused items past their retention"),
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "retention prune of refused items failed");
                        break;
                    }
                }
            }
            let before = now_ms() - keep.as_millis() as i64;
            loop {
                match store.prune(before).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(deleted = n, "pruned delivered events past retention")
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "retention prune failed");
                        break;
                    }
                }
            }
        }
    })
}
