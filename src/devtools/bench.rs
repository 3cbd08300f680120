//! `provisioner bench`: throughput, latency, CPU and memory, against a sequential
//! baseline in the same run.
//!
//! This process hosts the embedded broker (librdkafka's mock cluster; or, with
//! `--broker`, uses a real Kafka), the SCIM emulator and the load generator; the
//! service runs as a **child process**
//! (`provisioner run`), so its CPU time and peak RSS are read from `/proc/<pid>` and
//! exclude the broker, the emulator and the load generator.
//!
//! Phases:
//! 1. **throughput**: `events` events (half creates, half deletes, `users` users) are
//!    preloaded over `partitions` partitions; the service drains them. Sustained
//!    events/s, CPU µs per event, peak RSS.
//! 2. **baseline**: the same service with `pipeline.ordering = "partition"` (one event
//!    in flight per partition, what a plain at-least-once consumer does) on a smaller
//!    preload; the ratio of the two rates.
//! 3. **latency**: an open-loop load at `rate` events/s for `duration`; event-to-result
//!    latency (publish to result on the results topic) and overhead (that minus the
//!    target's own latency: one call for a create, two for a delete).
//! 4. **memory** (with `--backlog N`): N events preloaded, a slow target, the service
//!    runs for `backlog_seconds`; peak RSS must stay flat whatever N.
//! 5. **without state** (with `--compare-state`): the throughput phase again with
//!    `state.enabled = false`, for the state's cost in the same run.
//! 6. **restore** (with `--restore N[,N…]`): the state topic preloaded with N users'
//!    records; a fresh service (empty local store) restores them before applying a
//!    sentinel event. Restore time (from the service's own histogram), time to the
//!    sentinel's result, peak RSS and the local store's size.
//!
//! Every phase runs with the provisioning state on unless it says otherwise.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::devtools::emulators::scim::{self as scim_emulator, ScimEmulatorSettings};
use crate::devtools::emulators::Faults;
use crate::result::ProvisioningResult;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub events: usize,
    pub partitions: i32,
    /// Distinct users; default `events / 2` (each created, then deleted).
    pub users: Option<usize>,
    pub target_latency: Duration,
    pub baseline_events: usize,
    pub rate: u64,
    pub duration: Duration,
    /// Memory check: this many events preloaded against a slow target.
    pub backlog: Option<usize>,
    pub backlog_seconds: u64,
    pub json: bool,
    /// Skip phases (for quick runs and tests).
    pub skip_latency: bool,
    pub skip_baseline: bool,
    /// The service consumer's `fetch.wait.max.ms`. The mock broker does not answer a
    /// waiting fetch when data arrives (a real broker does), so a short wait stands in
    /// for Kafka's long polling.
    pub fetch_wait: Duration,
    /// Also run the throughput phase with the provisioning state off.
    pub compare_state: bool,
    /// Restore phases: users' state records preloaded, then a fresh service.
    pub restore_users: Vec<usize>,
    /// A real Kafka to run against (`host:port`) instead of the embedded mock cluster.
    pub broker: Option<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            events: 100_000,
            partitions: 8,
            users: None,
            target_latency: Duration::from_millis(50),
            baseline_events: 2_000,
            rate: 1_000,
            duration: Duration::from_secs(10),
            backlog: None,
            backlog_seconds: 30,
            json: false,
            skip_latency: false,
            skip_baseline: false,
            fetch_wait: Duration::from_millis(5),
            compare_state: false,
            restore_users: Vec::new(),
            broker: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("embedded Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the service process: {0}")]
    Service(String),
}

#[derive(Debug, Default, Serialize)]
pub struct ThroughputReport {
    pub events: usize,
    pub users: usize,
    pub partitions: i32,
    pub seconds: f64,
    pub events_per_second: f64,
    pub cpu_microseconds_per_event: f64,
    pub peak_rss_mib: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct LatencyReport {
    pub offered_events_per_second: u64,
    pub events: usize,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    pub overhead_ms_p50: f64,
    pub overhead_ms_p99: f64,
    pub cpu_microseconds_per_event: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct MemoryReport {
    pub backlog_events: usize,
    pub target_latency_ms: u64,
    pub seconds_run: u64,
    pub events_finished: usize,
    pub peak_rss_mib: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct RestoreReport {
    pub users: usize,
    pub partitions: i32,
    /// Sum over partitions of the service's own restore durations (they run in parallel).
    pub restore_seconds_total: f64,
    /// The slowest partition's restore is at most this (histogram bucket bound).
    pub restore_seconds_max_bucket: f64,
    /// From the service's start to the sentinel event's result (group join included).
    pub seconds_to_first_result: f64,
    /// From the service's start until every partition is restored.
    pub seconds_to_all_restored: f64,
    pub records_restored: u64,
    pub store_mib: f64,
    pub peak_rss_mib: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct BenchReport {
    pub target_latency_ms: u64,
    pub throughput: ThroughputReport,
    pub baseline: Option<ThroughputReport>,
    pub speedup_over_baseline: Option<f64>,
    pub latency: Option<LatencyReport>,
    pub memory: Option<MemoryReport>,
    /// The throughput phase with the provisioning state off.
    pub without_state: Option<ThroughputReport>,
    pub restores: Vec<RestoreReport>,
    pub machine_cores: usize,
}

/// The broker, the SCIM emulator and a scratch directory, shared by all phases.
struct Rig {
    /// librdkafka's mock cluster, hosted here; `None` with `--broker` (a real Kafka).
    cluster: Option<MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    bootstrap: String,
    scim_url: String,
    emulator: scim_emulator::ScimEmulator,
    directory: PathBuf,
    run: usize,
    /// Topic and group names of the current phase.
    prefix: String,
    fetch_wait: Duration,
}

pub async fn run(options: BenchOptions) -> Result<BenchReport, BenchError> {
    let (cluster, bootstrap) = match &options.broker {
        Some(address) => (None, address.clone()),
        None => {
            let cluster = MockCluster::new(1)?;
            let bootstrap = cluster.bootstrap_servers();
            (Some(cluster), bootstrap)
        }
    };
    let shutdown = CancellationToken::new();
    let emulator = scim_emulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        ScimEmulatorSettings {
            faults: Faults {
                latency: options.target_latency,
                ..Faults::default()
            },
            // No ETags: the bench measures provisioning, not version bookkeeping.
            etag: false,
            ..ScimEmulatorSettings::default()
        },
        shutdown.clone(),
    )
    .await?;
    let directory = std::env::temp_dir().join(format!("provisioner-bench-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let mut rig = Rig {
        cluster,
        bootstrap,
        scim_url: emulator.base_url(),
        emulator,
        directory,
        run: 0,
        prefix: String::new(),
        fetch_wait: options.fetch_wait,
    };
    let say = |line: String| {
        if !options.json {
            eprintln!("{line}");
        }
    };

    let mut report = BenchReport {
        target_latency_ms: options.target_latency.as_millis() as u64,
        machine_cores: std::thread::available_parallelism()
            .map(|cores| cores.get())
            .unwrap_or(1),
        ..BenchReport::default()
    };
    let users = options.users.unwrap_or(options.events / 2).max(1);
    say(format!(
        "throughput: {} events, {users} users, {} partitions, target latency {} ms …",
        options.events,
        options.partitions,
        options.target_latency.as_millis()
    ));
    report.throughput = rig
        .throughput(options.events, users, options.partitions, "user", true)
        .await?;
    say(format!("  {:.0} events/s", report.throughput.events_per_second));

    if !options.skip_baseline {
        let baseline_users = (options.baseline_events / 2).max(1);
        say(format!(
            "baseline (one event in flight per partition): {} events …",
            options.baseline_events
        ));
        let baseline = rig
            .throughput(
                options.baseline_events,
                baseline_users,
                options.partitions,
                "partition",
                true,
            )
            .await?;
        say(format!("  {:.0} events/s", baseline.events_per_second));
        report.speedup_over_baseline =
            Some(report.throughput.events_per_second / baseline.events_per_second.max(f64::MIN_POSITIVE));
        report.baseline = Some(baseline);
    }

    if !options.skip_latency {
        say(format!(
            "latency: {} events/s offered for {} s …",
            options.rate,
            options.duration.as_secs()
        ));
        report.latency = Some(rig.latency(options.rate, options.duration, options.partitions).await?);
    }

    if options.compare_state {
        say(format!(
            "throughput without the provisioning state: {} events …",
            options.events
        ));
        let without = rig
            .throughput(options.events, users, options.partitions, "user", false)
            .await?;
        say(format!("  {:.0} events/s", without.events_per_second));
        report.without_state = Some(without);
    }

    for &restore_users in &options.restore_users {
        say(format!(
            "restore: {restore_users} users' state records, a fresh instance …"
        ));
        let restore = rig.restore(restore_users, options.partitions).await?;
        say(format!(
            "  restored in {:.1} s (sum over partitions), first result after {:.1} s",
            restore.restore_seconds_total, restore.seconds_to_first_result
        ));
        report.restores.push(restore);
    }

    if let Some(backlog) = options.backlog {
        say(format!(
            "memory: {backlog} events of backlog, target latency 1 s, {} s …",
            options.backlog_seconds
        ));
        report.memory = Some(rig.memory(backlog, options.partitions, options.backlog_seconds).await?);
    }
    shutdown.cancel();
    let _ = std::fs::remove_dir_all(&rig.directory);
    Ok(report)
}

impl Rig {
    async fn topics(&mut self, partitions: i32) -> Result<(String, String), BenchError> {
        self.run += 1;
        // Names unique per process too: a real broker keeps the topics of earlier runs.
        let prefix = format!("bench-{}-{}", std::process::id(), self.run);
        self.prefix = prefix.clone();
        let events = format!("{prefix}-events");
        let results = format!("{prefix}-results");
        let topics = [
            (events.clone(), partitions, true),
            (format!("{prefix}-state"), partitions, false),
            (results.clone(), 1, true),
            (format!("{prefix}-replies"), 1, true),
            (format!("{prefix}-dlq"), 1, true),
            // The retry topic of the one connector (parking), partitioned like the input.
            (format!("{prefix}-retry.directory"), partitions, true),
            // The membership topic (groups), partitioned like the input.
            (format!("{prefix}-memberships"), partitions, true),
        ];
        match &self.cluster {
            Some(cluster) => {
                for (name, count, _) in &topics {
                    cluster.create_topic(name, *count, 1)?;
                }
            }
            None => {
                use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
                let admin: AdminClient<rdkafka::client::DefaultClientContext> =
                    ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create()?;
                let new_topics: Vec<NewTopic> = topics
                    .iter()
                    .map(|(name, count, plain)| {
                        let topic = NewTopic::new(name, *count, TopicReplication::Fixed(1));
                        if *plain {
                            topic
                        } else {
                            topic.set("cleanup.policy", "compact")
                        }
                    })
                    .collect();
                for result in admin.create_topics(&new_topics, &AdminOptions::new()).await? {
                    result
                        .map_err(|(name, code)| BenchError::Service(format!("cannot create topic {name}: {code:?}")))?;
                }
            }
        }
        Ok((events, results))
    }

    fn write_config(&self, ordering: &str, state: bool) -> Result<PathBuf, BenchError> {
        self.write_config_with_admin(ordering, state, "127.0.0.1:0")
    }

    fn write_config_with_admin(&self, ordering: &str, state: bool, admin: &str) -> Result<PathBuf, BenchError> {
        let run = &self.prefix;
        let config = format!(
            r#"
            [kafka]
            bootstrap_servers = "{bootstrap}"
            group_id = "{run}"
            event_topics = ["{run}-events"]
            results_topic = "{run}-results"
            reply_topic = "{run}-replies"
            dead_letter_topic = "{run}-dlq"
            [state]
            enabled = {state}
            topic = "{run}-state"
            dir = "{state_dir}"
            [parking]
            topic_prefix = "{run}-retry."
            [groups]
            membership_topic = "{run}-memberships"
            # The load generator places events with librdkafka's partitioner.
            user_partitioner = "crc32"
            [kafka.properties]
            "queued.max.messages.kbytes" = "8192"
            "fetch.wait.max.ms" = "{fetch_wait}"

            [pipeline]
            max_in_flight = 1024
            max_buffered_events = 8192
            ordering = "{ordering}"

            [admin]
            listen = "{admin}"

            [telemetry]
            level = "error"

            [connectors.directory]
            type = "scim2"
            base_url = "{scim_url}"
            [connectors.directory.delivery]
            max_in_flight = 1024

            [[tenants.bench.resident.bindings]]
            connector = "directory"
            blocking = true
            "#,
            bootstrap = self.bootstrap,
            scim_url = self.scim_url,
            fetch_wait = self.fetch_wait.as_millis().max(1),
            state_dir = self.directory.join(format!("state-{}", self.run)).display(),
        );
        let path = self.directory.join(format!("bench-{}.toml", self.run));
        std::fs::write(&path, config)?;
        Ok(path)
    }

    fn producer(&self) -> Result<FutureProducer, BenchError> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("linger.ms", "0")
            .set("queue.buffering.max.messages", "200000")
            .create()?)
    }

    fn results_reader(&self, topic: &str) -> Result<StreamConsumer, BenchError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "1")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&assignment)?;
        Ok(consumer)
    }

    /// Preloads `events` (creates then deletes of `users` users) and returns their ids.
    async fn preload(
        &self,
        producer: &FutureProducer,
        topic: &str,
        events: usize,
        users: usize,
    ) -> Result<(), BenchError> {
        let mut pending = futures::stream::FuturesUnordered::new();
        for index in 0..events {
            let (id, key, payload) = bench_event(index, users);
            pending.push(async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(&key).payload(&payload),
                        Timeout::After(Duration::from_secs(60)),
                    )
                    .await
                    .map(|_| id)
                    .map_err(|(error, _)| error)
            });
            // Keep the producer queue bounded.
            while pending.len() >= 20_000 {
                use futures::StreamExt;
                pending.next().await.expect("non-empty")?;
            }
        }
        use futures::StreamExt;
        while let Some(result) = pending.next().await {
            result?;
        }
        Ok(())
    }

    async fn throughput(
        &mut self,
        events: usize,
        users: usize,
        partitions: i32,
        ordering: &str,
        state: bool,
    ) -> Result<ThroughputReport, BenchError> {
        let (events_topic, results_topic) = self.topics(partitions).await?;
        let producer = self.producer()?;
        self.preload(&producer, &events_topic, events, users).await?;
        let reader = self.results_reader(&results_topic)?;
        let config = self.write_config(ordering, state)?;
        let mut service = ServiceChild::start(&config)?;
        // Timed from the first result, so the consumer-group join is not counted.
        let mut first: Option<Instant> = None;
        let mut seen = 0usize;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            tokio::time::timeout(Duration::from_secs(60), reader.recv())
                .await
                .map_err(|_| BenchError::Service("no result for 60 s".into()))??;
            if first.is_none() {
                first = Some(Instant::now());
            }
            seen += 1;
            if seen >= events {
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Service("the run took over 10 minutes".into()));
            }
        }
        let elapsed = first.expect("at least one result").elapsed();
        let (cpu, peak_rss) = service.usage()?;
        service.stop()?;
        Ok(ThroughputReport {
            events,
            users,
            partitions,
            seconds: elapsed.as_secs_f64(),
            events_per_second: (events.saturating_sub(1)) as f64 / elapsed.as_secs_f64().max(1e-9),
            cpu_microseconds_per_event: cpu.as_secs_f64() * 1e6 / events as f64,
            peak_rss_mib: peak_rss,
        })
    }

    async fn latency(&mut self, rate: u64, duration: Duration, partitions: i32) -> Result<LatencyReport, BenchError> {
        let (events_topic, results_topic) = self.topics(partitions).await?;
        let producer = self.producer()?;
        let reader = self.results_reader(&results_topic)?;
        let config = self.write_config("user", true)?;
        let mut service = ServiceChild::start(&config)?;
        // Warm up: one event end to end on every partition, so the group join and every
        // partition's state restore are behind us.
        let mut warming = std::collections::HashSet::new();
        for partition in 0..partitions {
            let (_, warm_key, warm_payload) = bench_event(0, 1);
            let warm_id = format!("warm-{partition}");
            let mut payload: serde_json::Value = serde_json::from_slice(&warm_payload).expect("JSON");
            payload["id"] = json!(warm_id);
            let payload = serde_json::to_vec(&payload).expect("JSON");
            producer
                .send(
                    FutureRecord::to(&events_topic)
                        .key(&warm_key)
                        .payload(&payload)
                        .partition(partition),
                    Timeout::After(Duration::from_secs(30)),
                )
                .await
                .map_err(|(error, _)| error)?;
            warming.insert(warm_id);
        }
        while !warming.is_empty() {
            let message = tokio::time::timeout(Duration::from_secs(60), reader.recv())
                .await
                .map_err(|_| BenchError::Service("no warm-up result for 60 s".into()))??;
            if let Some(id) = result_id(&message) {
                warming.remove(&id);
            }
        }
        let cpu_start = service.usage()?.0;
        let total = (rate as f64 * duration.as_secs_f64()) as usize;
        let users = usize::MAX / 4; // every event its own user: latency, not ordering, is measured
        let mut sent_at: HashMap<String, (Instant, u32)> = HashMap::with_capacity(total);
        let started = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let mut results: Vec<(f64, f64)> = Vec::with_capacity(total);
        let mut next_send = 0usize;
        while results.len() < total {
            let due = started + interval * next_send as u32;
            tokio::select! {
                biased;
                message = reader.recv() => {
                    let message = message?;
                    if let Some(id) = result_id(&message) {
                        if let Some((sent, target_calls)) = sent_at.remove(&id) {
                            let latency = sent.elapsed().as_secs_f64() * 1000.0;
                            let target = target_calls as f64 * self.emulator_latency_ms();
                            results.push((latency, latency - target));
                        }
                    }
                }
                _ = tokio::time::sleep_until(due.into()), if next_send < total => {
                    // Creates of distinct users: one target call each, and no event
                    // waits behind another of the same user.
                    let (id, key, payload) = bench_event(1_000_000 + 2 * next_send, users);
                    let target_calls = 1;
                    sent_at.insert(id, (Instant::now(), target_calls));
                    let record = FutureRecord::to(&events_topic).key(&key).payload(&payload);
                    producer.send_result(record).map_err(|(error, _)| error)?;
                    next_send += 1;
                }
            }
            if started.elapsed() > duration * 6 + Duration::from_secs(60) {
                return Err(BenchError::Service("results stopped arriving".into()));
            }
        }
        let cpu = service.usage()?.0.saturating_sub(cpu_start);
        service.stop()?;
        let mut latencies: Vec<f64> = results.iter().map(|(latency, _)| *latency).collect();
        let mut overheads: Vec<f64> = results.iter().map(|(_, overhead)| *overhead).collect();
        latencies.sort_by(f64::total_cmp);
        overheads.sort_by(f64::total_cmp);
        Ok(LatencyReport {
            offered_events_per_second: rate,
            events: total,
            latency_ms_p50: percentile(&latencies, 0.50),
            latency_ms_p99: percentile(&latencies, 0.99),
            latency_ms_max: latencies.last().copied().unwrap_or_default(),
            overhead_ms_p50: percentile(&overheads, 0.50),
            overhead_ms_p99: percentile(&overheads, 0.99),
            cpu_microseconds_per_event: cpu.as_secs_f64() * 1e6 / total as f64,
        })
    }

    async fn memory(&mut self, backlog: usize, partitions: i32, seconds: u64) -> Result<MemoryReport, BenchError> {
        self.emulator.set_faults(Faults {
            latency: Duration::from_secs(1),
            ..Faults::default()
        });
        let (events_topic, results_topic) = self.topics(partitions).await?;
        let producer = self.producer()?;
        self.preload(&producer, &events_topic, backlog, backlog / 2).await?;
        let reader = self.results_reader(&results_topic)?;
        let config = self.write_config("user", true)?;
        let mut service = ServiceChild::start(&config)?;
        let run_until = Instant::now() + Duration::from_secs(seconds);
        let mut finished = 0usize;
        let mut peak = 0.0f64;
        while Instant::now() < run_until {
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), reader.recv()).await {
                finished += 1;
            }
            peak = peak.max(service.usage()?.1);
        }
        let (_, final_peak) = service.usage()?;
        service.stop()?;
        Ok(MemoryReport {
            backlog_events: backlog,
            target_latency_ms: 1000,
            seconds_run: seconds,
            events_finished: finished,
            peak_rss_mib: peak.max(final_peak),
        })
    }

    /// Preloads the state topic with `users` records (one per user, on the partition
    /// the user's events go to), then starts a fresh service with an empty local store
    /// and one sentinel event, and reads the restore figures from its metrics.
    async fn restore(&mut self, users: usize, partitions: i32) -> Result<RestoreReport, BenchError> {
        let (events_topic, results_topic) = self.topics(partitions).await?;
        let state_topic = format!("{}-state", self.prefix);
        let producer = self.producer()?;
        let mut pending = futures::stream::FuturesUnordered::new();
        for user in 0..users {
            let user_id = format!("bench-user-{user}");
            let event_key = format!("bench/{user_id}");
            let partition = crate::kafka::partitioners::librdkafka_crc32(event_key.as_bytes(), partitions);
            let key = format!("directory:{event_key}");
            let record = crate::state::record::StateRecord {
                schema: crate::state::record::STATE_SCHEMA_VERSION,
                version: crate::domain::version::EventVersion {
                    epoch: 0,
                    partition,
                    offset: user as i64,
                    sequence: None,
                },
                account: crate::state::record::AccountState::Present,
                remote_id: Some(format!("{:032x}", user)),
                event_id: format!("restored-{user}"),
                updated_at: chrono::Utc::now(),
                parked_until: None,
                members_emitted: None,
            }
            .encode();
            let producer = &producer;
            let topic = &state_topic;
            pending.push(async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(&key).payload(&record).partition(partition),
                        Timeout::After(Duration::from_secs(60)),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(error, _)| error)
            });
            while pending.len() >= 20_000 {
                use futures::StreamExt;
                pending.next().await.expect("non-empty")?;
            }
        }
        {
            use futures::StreamExt;
            while let Some(result) = pending.next().await {
                result?;
            }
        }
        let reader = self.results_reader(&results_topic)?;
        let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = self.write_config_with_admin("user", true, &admin.to_string())?;
        let started = Instant::now();
        let mut service = ServiceChild::start(&config)?;
        // The sentinel: an update of a restored user, applied after its partition's restore.
        let (_, key, payload) = bench_event(0, 1);
        producer
            .send(
                FutureRecord::to(&events_topic).key(&key).payload(&payload),
                Timeout::After(Duration::from_secs(60)),
            )
            .await
            .map_err(|(error, _)| error)?;
        tokio::time::timeout(Duration::from_secs(600), reader.recv())
            .await
            .map_err(|_| BenchError::Service("no result within 10 minutes of the restore".into()))??;
        let seconds_to_first_result = started.elapsed().as_secs_f64();
        // Every partition restored (the sentinel's may finish before the others).
        let deadline = Instant::now() + Duration::from_secs(600);
        let metrics = loop {
            let metrics = reqwest::get(format!("http://{admin}/metrics"))
                .await
                .map_err(|error| BenchError::Service(format!("metrics: {error}")))?
                .text()
                .await
                .map_err(|error| BenchError::Service(format!("metrics: {error}")))?;
            let partitions_restored = metrics
                .lines()
                .find(|line| line.starts_with("provisioner_state_restore_duration_seconds_count{result=\"ok\"}"))
                .and_then(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
                .unwrap_or(0.0);
            if partitions_restored as i32 >= partitions || Instant::now() > deadline {
                break metrics;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let seconds_to_all_restored = started.elapsed().as_secs_f64();
        let (_, peak_rss) = service.usage()?;
        service.stop()?;
        let value = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|line| line.starts_with(name))
                .filter_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse::<f64>().ok()))
                .sum()
        };
        // The smallest bucket bound that holds every successful restore.
        let count = value("provisioner_state_restore_duration_seconds_count{result=\"ok\"}");
        let max_bucket = metrics
            .lines()
            .filter(|line| {
                line.starts_with("provisioner_state_restore_duration_seconds_bucket{") && line.contains("result=\"ok\"")
            })
            .filter_map(|line| {
                let bound = line.split("le=\"").nth(1)?.split('"').next()?.parse::<f64>().ok()?;
                let cumulative = line.rsplit_once(' ')?.1.parse::<f64>().ok()?;
                (cumulative >= count && count > 0.0).then_some(bound)
            })
            .fold(f64::INFINITY, f64::min);
        Ok(RestoreReport {
            users,
            partitions,
            restore_seconds_total: value("provisioner_state_restore_duration_seconds_sum{result=\"ok\"}"),
            restore_seconds_max_bucket: max_bucket,
            seconds_to_first_result,
            seconds_to_all_restored,
            records_restored: value("provisioner_state_records_restored_total") as u64,
            store_mib: value("provisioner_state_store_bytes") / (1024.0 * 1024.0),
            peak_rss_mib: peak_rss,
        })
    }

    fn emulator_latency_ms(&self) -> f64 {
        self.emulator
            .control
            .faults
            .lock()
            .expect("faults lock")
            .latency
            .as_secs_f64()
            * 1000.0
    }
}

fn result_id(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<String> {
    let payload = message.payload()?;
    serde_json::from_slice::<ProvisioningResult>(payload)
        .ok()
        .map(|result| result.event_id)
}

/// Event `index`: even indexes create user `index/2 mod users`, odd ones delete it.
fn bench_event(index: usize, users: usize) -> (String, String, Vec<u8>) {
    let user = (index / 2) % users;
    let (event_type, verb) = if index.is_multiple_of(2) {
        ("user.created", "c")
    } else {
        ("user.deleted", "d")
    };
    let id = format!("b{index}{verb}");
    let user_id = format!("bench-user-{user}");
    let payload = serde_json::to_vec(&json!({
        "specversion": "1.0", "id": id, "source": "/bench", "type": event_type,
        "data": {"tenant": "bench", "user": {"id": user_id, "userName": format!("user{user}"),
                 "name": {"givenName": "Bench", "familyName": format!("User{user}")},
                 "emails": [{"value": format!("user{user}@example.com"), "primary": true}]}}
    }))
    .expect("JSON");
    (id, format!("bench/{user_id}"), payload)
}

fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// The service under test, as a child process.
struct ServiceChild {
    child: Child,
}

impl ServiceChild {
    fn start(config: &Path) -> Result<ServiceChild, BenchError> {
        let child = Command::new(std::env::current_exe()?)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(ServiceChild { child })
    }

    /// CPU time (user + system) and peak RSS in MiB, from /proc.
    fn usage(&self) -> Result<(Duration, f64), BenchError> {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces) start after ')'.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
            + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        let ticks_per_second = 100.0; // USER_HZ on Linux
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let peak_kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Ok((
            Duration::from_secs_f64(ticks as f64 / ticks_per_second),
            peak_kib / 1024.0,
        ))
    }

    fn stop(&mut self) -> Result<(), BenchError> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait()?;
        if !status.success() {
            return Err(BenchError::Service(format!("exited with {status}")));
        }
        Ok(())
    }
}

impl Drop for ServiceChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The human-readable table.
pub fn render(report: &BenchReport) -> String {
    let mut out = String::new();
    let throughput = &report.throughput;
    out.push_str(&format!(
        "provisioner bench — target latency {} ms, {} cores\n\n",
        report.target_latency_ms, report.machine_cores
    ));
    out.push_str(&format!(
        "  throughput          {:>10.0} events/s  ({} events, {} users, {} partitions, {:.1} s)\n",
        throughput.events_per_second, throughput.events, throughput.users, throughput.partitions, throughput.seconds
    ));
    out.push_str(&format!(
        "  CPU per event       {:>10.1} µs        (service process only: user+sys from /proc)\n",
        throughput.cpu_microseconds_per_event
    ));
    out.push_str(&format!(
        "  peak RSS            {:>10.1} MiB\n",
        throughput.peak_rss_mib
    ));
    if let (Some(baseline), Some(speedup)) = (&report.baseline, report.speedup_over_baseline) {
        out.push_str(&format!(
            "  sequential baseline {:>10.0} events/s  (one in flight per partition, {} events)\n",
            baseline.events_per_second, baseline.events
        ));
        out.push_str(&format!("  speed-up            {:>10.1}×\n", speedup));
    }
    if let Some(latency) = &report.latency {
        out.push_str(&format!(
            "  at {} events/s offered ({} events):\n",
            latency.offered_events_per_second, latency.events
        ));
        out.push_str(&format!(
            "    event→result      p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n",
            latency.latency_ms_p50, latency.latency_ms_p99, latency.latency_ms_max
        ));
        out.push_str(&format!(
            "    overhead          p50 {:.2} ms  p99 {:.2} ms   (minus the target's own latency)\n",
            latency.overhead_ms_p50, latency.overhead_ms_p99
        ));
        out.push_str(&format!(
            "    CPU per event     {:.1} µs\n",
            latency.cpu_microseconds_per_event
        ));
    }
    if let Some(without) = &report.without_state {
        out.push_str(&format!(
            "  without the state   {:>10.0} events/s, {:.1} µs CPU per event, peak RSS {:.1} MiB\n",
            without.events_per_second, without.cpu_microseconds_per_event, without.peak_rss_mib
        ));
        out.push_str(&format!(
            "  state's cost        {:>10.1}% throughput, {:+.1} µs CPU per event\n",
            (1.0 - throughput.events_per_second / without.events_per_second.max(f64::MIN_POSITIVE)) * 100.0,
            throughput.cpu_microseconds_per_event - without.cpu_microseconds_per_event
        ));
    }
    for restore in &report.restores {
        out.push_str(&format!(
            "  restore {} users ({} partitions): {:.2} s summed over partitions (slowest ≤ {} s); from the service's start: first result {:.1} s, all restored {:.1} s; {} records, store {:.1} MiB, peak RSS {:.1} MiB\n",
            restore.users,
            restore.partitions,
            restore.restore_seconds_total,
            restore.restore_seconds_max_bucket,
            restore.seconds_to_first_result,
            restore.seconds_to_all_restored,
            restore.records_restored,
            restore.store_mib,
            restore.peak_rss_mib
        ));
    }
    if let Some(memory) = &report.memory {
        out.push_str(&format!(
            "  memory: {} events of backlog, {} ms target, {} s: peak RSS {:.1} MiB ({} events finished)\n",
            memory.backlog_events,
            memory.target_latency_ms,
            memory.seconds_run,
            memory.peak_rss_mib,
            memory.events_finished
        ));
    }
    out
}
