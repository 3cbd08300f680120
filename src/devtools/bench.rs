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
//!    target's own latency: how long the emulator held the event's one call, measured
//!    by the emulator, so that its timer's overshoot is not counted as ours).
//! 4. **memory** (with `--backlog N`): N events preloaded, a slow target, the service
//!    runs for `backlog_seconds`; peak RSS must stay flat whatever N.
//! 5. **without state** (with `--compare-state`): the throughput phase again with
//!    `state.enabled = false`, for the state's cost in the same run.
//! 6. **restore** (with `--restore N[,N…]`): the state topic preloaded with N users'
//!    records; a fresh service (empty local store) restores them before applying a
//!    sentinel event. Restore time (from the service's own histogram), time to the
//!    sentinel's result, peak RSS and the local store's size.
//! 7. **groups** (with `--groups N`): where a group's memberships are applied, measured
//!    both ways for one `group.created` event with N members (see `Rig::groups`).
//!    **A**, what the service does: each membership in its member's lane, the member's
//!    remote id from local state, members of the group batched into shared PATCHes.
//!    **B**, the alternative: the group's lane resolves every member against the
//!    target (`GET /Users?filter=externalId eq …`), then PATCHes. Requests and time
//!    for each, the service's CPU for A.
//!
//! `--events 0` skips the throughput phase (and `--compare-state`, its rerun), so
//! `--events 0 --skip-baseline --skip-latency --groups 1000` runs the groups phase alone.
//!
//! Every phase runs with the provisioning state on unless it says otherwise.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::connectors::scim::filter_literal;
use crate::connectors::scim::settings::Scim2Settings;
use crate::devtools::emulators::scim::{self as scim_emulator, ScimEmulatorSettings};
use crate::devtools::emulators::Faults;
use crate::result::{Outcome, ProvisioningResult, ResultScope, Status};

/// The connector's `delivery.max_in_flight` in every phase but groups: those measure the
/// service, so the target's concurrency must not be what limits them.
const CONNECTOR_MAX_IN_FLIGHT: usize = 1024;
/// The service's `pipeline.max_in_flight` (and the floor's events at once).
const MAX_IN_FLIGHT: usize = 1024;
/// The one connector's retry topic, after the run's prefix.
const RETRY_TOPIC_SUFFIX: &str = "-retry.directory";
/// 14 days: twice the default `parking.max_parked_time`.
const RETRY_TOPIC_RETENTION_MS: &str = "1209600000";

/// How long a phase may wait for one result before it gives up: the service is stuck.
const RESULT_SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// How long a phase may run at most.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Events in the throughput phase; 0 skips it.
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
    /// Groups phase: members of the one group (0 skips it, as does `None`).
    pub group_members: Option<usize>,
    /// Groups phase: the connector's `delivery.max_in_flight` (A) and B's lookups at once.
    pub groups_max_in_flight: usize,
    /// Also run the throughput and latency phases with the floor (`devtools::floor`)
    /// in place of the service: what the parts cost before the service does anything.
    pub floor: bool,
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
            fetch_wait: Duration::from_millis(1),
            compare_state: false,
            restore_users: Vec::new(),
            broker: None,
            group_members: None,
            groups_max_in_flight: 32,
            floor: false,
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
    /// What the target took per call, as the emulator measured it.
    pub target_ms_p50: f64,
    pub target_ms_p99: f64,
    /// Events whose call the emulator did not record (their nominal latency was used).
    pub events_without_measured_target: usize,
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

/// A: memberships applied in the members' lanes (what the service does). Counted from
/// the group event's publication to the last membership's complete result.
#[derive(Debug, Default, Serialize)]
pub struct MemberLanesReport {
    /// Requests the SCIM emulator answered in that interval, of every kind.
    pub requests: u64,
    /// Of those, membership PATCHes (`PATCH /Groups/{id}`).
    pub group_patch_requests: u64,
    /// Of those, the group's own: its lookup by `externalId` and its POST.
    pub group_requests: u64,
    /// Of those, user lookups (`GET /Users`): A needs none.
    pub user_lookups: u64,
    /// The rest, e.g. `/ServiceProviderConfig`, read once per process before the
    /// connector's first membership request.
    pub other_requests: u64,
    /// The most members one group request carried (the emulator's count).
    pub largest_batch: usize,
    /// Members per membership request, from the service's own histogram.
    pub mean_batch: f64,
    /// Membership requests per batch size, from that histogram (empty buckets left out).
    pub batches: Vec<BatchSizeBucket>,
    /// From the publication to the group event's own result (group created, its
    /// membership records written).
    pub seconds_to_group_result: f64,
    /// From the publication to the last membership's result.
    pub seconds: f64,
    /// Memberships whose result is `members_added`; `memberships_other` got another.
    pub memberships_added: usize,
    pub memberships_other: usize,
    /// The group's members on the emulator afterwards.
    pub members_on_target: usize,
    /// The service process's CPU (user + system) over the interval.
    pub cpu_milliseconds: f64,
}

/// Membership requests that carried more members than the bucket below this one and at
/// most `at_most`.
#[derive(Debug, Default, Serialize)]
pub struct BatchSizeBucket {
    pub at_most: f64,
    pub requests: u64,
}

/// B: the group's lane resolves every member against the target, then PATCHes. Real
/// requests from the bench to the same emulator (same latency), with the connector's
/// HTTP client settings, `max_in_flight` at once, for a second group of the same users.
/// The target's calls alone: B would also pay the group event's Kafka hop (consume,
/// result), which A's figures include, so B's time is a lower bound.
#[derive(Debug, Default, Serialize)]
pub struct GroupLaneReport {
    /// Every request below, as the emulator counted them.
    pub requests: u64,
    /// The group's own: its lookup by `externalId` and its POST, one after the other.
    pub group_requests: u64,
    pub group_seconds: f64,
    /// `GET /Users?filter=externalId eq "<id>"`, one per member.
    pub user_lookups: u64,
    pub lookup_seconds: f64,
    /// `PATCH /Groups/{id}` adding up to the connector's `max_members_per_request`.
    pub group_patch_requests: u64,
    pub patch_seconds: f64,
    /// `group_seconds + lookup_seconds + patch_seconds`.
    pub seconds: f64,
    /// The group's members on the emulator afterwards.
    pub members_on_target: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct GroupsReport {
    pub members: usize,
    pub partitions: i32,
    /// The connector's `delivery.max_in_flight` in A, and B's requests at once.
    pub max_in_flight: usize,
    /// The connector's `max_members_per_request` (SCIM's default).
    pub max_members_per_request: usize,
    pub member_lanes: MemberLanesReport,
    pub group_lane: GroupLaneReport,
}

#[derive(Debug, Default, Serialize)]
pub struct BenchReport {
    pub target_latency_ms: u64,
    /// `None` with `--events 0`.
    pub throughput: Option<ThroughputReport>,
    pub baseline: Option<ThroughputReport>,
    pub speedup_over_baseline: Option<f64>,
    pub latency: Option<LatencyReport>,
    pub memory: Option<MemoryReport>,
    /// The throughput phase with the provisioning state off.
    pub without_state: Option<ThroughputReport>,
    pub restores: Vec<RestoreReport>,
    pub groups: Option<GroupsReport>,
    /// The throughput and latency phases run with the floor in place of the service.
    pub floor: Option<FloorReport>,
    pub machine_cores: usize,
}

/// The floor's figures (`--floor`), measured like the service's.
#[derive(Debug, Default, Serialize)]
pub struct FloorReport {
    pub throughput: Option<ThroughputReport>,
    pub latency: Option<LatencyReport>,
}

/// What a phase runs against the rig.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnderTest {
    Service,
    Floor,
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
    under_test: UnderTest,
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
        under_test: UnderTest::Service,
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
    if options.events > 0 {
        say(format!(
            "throughput: {} events, {users} users, {} partitions, target latency {} ms …",
            options.events,
            options.partitions,
            options.target_latency.as_millis()
        ));
        let throughput = rig
            .throughput(options.events, users, options.partitions, "user", true)
            .await?;
        say(format!("  {:.0} events/s", throughput.events_per_second));
        report.throughput = Some(throughput);
    }

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
        report.speedup_over_baseline = report
            .throughput
            .as_ref()
            .map(|throughput| throughput.events_per_second / baseline.events_per_second.max(f64::MIN_POSITIVE));
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

    // The same throughput phase with the state off: nothing to compare with --events 0.
    if options.compare_state && options.events > 0 {
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

    // Before the memory phase, which leaves the emulator at 1 s per request.
    if let Some(members) = options.group_members.filter(|members| *members > 0) {
        say(format!(
            "groups: one group.created with {members} members, {} partitions, {} requests in flight …",
            options.partitions, options.groups_max_in_flight
        ));
        let groups = rig
            .groups(members, options.partitions, options.groups_max_in_flight)
            .await?;
        say(format!(
            "  A: {} requests, {:.2} s; B: {} requests, {:.2} s",
            groups.member_lanes.requests,
            groups.member_lanes.seconds,
            groups.group_lane.requests,
            groups.group_lane.seconds
        ));
        report.groups = Some(groups);
    }

    if let Some(backlog) = options.backlog {
        say(format!(
            "memory: {backlog} events of backlog, target latency 1 s, {} s …",
            options.backlog_seconds
        ));
        report.memory = Some(rig.memory(backlog, options.partitions, options.backlog_seconds).await?);
    }
    // Last: the floor does not keep remote ids, so its deletes leave its users on the
    // emulator, where they would turn later phases' creates into conflicts.
    if options.floor {
        rig.emulator.set_faults(Faults {
            latency: options.target_latency,
            ..Faults::default()
        });
        rig.under_test = UnderTest::Floor;
        let mut floor = FloorReport::default();
        if options.events > 0 {
            say(format!("floor, throughput: {} events …", options.events));
            let throughput = rig
                .throughput(options.events, users, options.partitions, "user", true)
                .await?;
            say(format!("  {:.0} events/s", throughput.events_per_second));
            floor.throughput = Some(throughput);
        }
        if !options.skip_latency {
            say(format!("floor, latency: {} events/s offered …", options.rate));
            floor.latency = Some(rig.latency(options.rate, options.duration, options.partitions).await?);
        }
        rig.under_test = UnderTest::Service;
        report.floor = Some(floor);
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
            // Partitioned like the input: the mock cluster finds a fetch's record set by
            // walking the partition's list from its start (librdkafka's own FIXME), so one
            // partition holding every result made each fetch slower as a phase went on
            // (at the end of the latency phase, 45% of the mock's CPU).
            (results.clone(), partitions, true),
            (format!("{prefix}-replies"), 1, true),
            (format!("{prefix}-dlq"), 1, true),
            // The retry topic of the one connector (parking), partitioned like the input.
            (format!("{prefix}{RETRY_TOPIC_SUFFIX}"), partitions, true),
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
                        if name.ends_with(RETRY_TOPIC_SUFFIX) {
                            // Longer than parking.max_parked_time (7 days), as the service
                            // itself would create it; it checks.
                            topic.set("retention.ms", RETRY_TOPIC_RETENTION_MS)
                        } else if *plain {
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

    /// The service with this phase's configuration, or the floor on the same topics.
    fn start_under_test(&self, ordering: &str, state: bool) -> Result<ServiceChild, BenchError> {
        match self.under_test {
            UnderTest::Service => ServiceChild::start(&self.write_config(ordering, state)?),
            UnderTest::Floor => {
                let run = &self.prefix;
                let fetch_wait = format!("{}ms", self.fetch_wait.as_millis().max(1));
                let max_in_flight = MAX_IN_FLIGHT.to_string();
                ServiceChild::spawn(&[
                    "bench-floor",
                    "--bootstrap",
                    &self.bootstrap,
                    "--group-id",
                    run,
                    "--input-topic",
                    &format!("{run}-events"),
                    "--state-topic",
                    &format!("{run}-state"),
                    "--results-topic",
                    &format!("{run}-results"),
                    "--scim-url",
                    &self.scim_url,
                    "--fetch-wait",
                    &fetch_wait,
                    "--max-in-flight",
                    &max_in_flight,
                ])
            }
        }
    }

    fn write_config(&self, ordering: &str, state: bool) -> Result<PathBuf, BenchError> {
        self.write_config_with(ordering, state, "127.0.0.1:0", CONNECTOR_MAX_IN_FLIGHT)
    }

    fn write_config_with(
        &self,
        ordering: &str,
        state: bool,
        admin: &str,
        connector_max_in_flight: usize,
    ) -> Result<PathBuf, BenchError> {
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
            "fetch.wait.max.ms" = "{fetch_wait}"

            [pipeline]
            max_in_flight = {max_in_flight}
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
            max_in_flight = {connector_max_in_flight}

            [[tenants.bench.resident.bindings]]
            connector = "directory"
            blocking = true
            "#,
            bootstrap = self.bootstrap,
            scim_url = self.scim_url,
            fetch_wait = self.fetch_wait.as_millis().max(1),
            max_in_flight = MAX_IN_FLIGHT,
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

    fn results_reader(&self, topic: &str, partitions: i32) -> Result<StreamConsumer, BenchError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "1")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
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
        let reader = self.results_reader(&results_topic, partitions)?;
        let mut service = self.start_under_test(ordering, state)?;
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
        let reader = self.results_reader(&results_topic, partitions)?;
        let mut service = self.start_under_test("user", true)?;
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

        // The emulator records how long it held each create, by userName: overhead is
        // event→result minus what the target really took (its nominal latency, plus the
        // timer's overshoot and its handler), not minus the nominal latency alone.
        self.emulator.control.holds.enable();
        let mut sent_at: HashMap<String, (Instant, String)> = HashMap::with_capacity(total);
        let mut unmatched_holds = 0usize;
        let started = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let mut results: Vec<(f64, f64, f64)> = Vec::with_capacity(total);
        let mut next_send = 0usize;
        while results.len() < total {
            let due = started + interval * next_send as u32;
            tokio::select! {
                biased;
                message = reader.recv() => {
                    let message = message?;
                    if let Some(id) = result_id(&message) {
                        if let Some((sent, user_name)) = sent_at.remove(&id) {
                            let latency = sent.elapsed().as_secs_f64() * 1000.0;
                            let target = match self.emulator.control.holds.take(&user_name) {
                                Some(held) => held.as_secs_f64() * 1000.0,
                                None => {
                                    unmatched_holds += 1;
                                    self.emulator_latency_ms()
                                }
                            };
                            results.push((latency, latency - target, target));
                        }
                    }
                }
                _ = tokio::time::sleep_until(due.into()), if next_send < total => {
                    // Creates of distinct users: one target call each, and no event
                    // waits behind another of the same user.
                    let index = 1_000_000 + 2 * next_send;
                    let (id, key, payload) = bench_event(index, users);
                    sent_at.insert(id, (Instant::now(), bench_user_name(index, users)));
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
        let sorted = |pick: fn(&(f64, f64, f64)) -> f64| {
            let mut values: Vec<f64> = results.iter().map(pick).collect();
            values.sort_by(f64::total_cmp);
            values
        };
        let latencies = sorted(|result| result.0);
        let overheads = sorted(|result| result.1);
        let targets = sorted(|result| result.2);
        Ok(LatencyReport {
            offered_events_per_second: rate,
            events: total,
            latency_ms_p50: percentile(&latencies, 0.50),
            latency_ms_p99: percentile(&latencies, 0.99),
            latency_ms_max: latencies.last().copied().unwrap_or_default(),
            overhead_ms_p50: percentile(&overheads, 0.50),
            overhead_ms_p99: percentile(&overheads, 0.99),
            target_ms_p50: percentile(&targets, 0.50),
            target_ms_p99: percentile(&targets, 0.99),
            events_without_measured_target: unmatched_holds,
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
        let reader = self.results_reader(&results_topic, partitions)?;
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
        let reader = self.results_reader(&results_topic, partitions)?;
        let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = self.write_config_with("user", true, &admin.to_string(), CONNECTOR_MAX_IN_FLIGHT)?;
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
        let value = |name: &str| metric_value(&metrics, name);
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

    /// The groups phase: N users created and their results in, then one
    /// `group.created` event with all N as members, measured two ways.
    ///
    /// **A** runs in the service, with the connector at `max_in_flight`: the time from
    /// publishing the group event to every membership's complete result, the requests
    /// the emulator answered meanwhile (from its request log and counters), the batch
    /// sizes and the service's CPU. **B** runs from this process against the same
    /// emulator, for a second group of the same users ([`Rig::group_lane`]).
    async fn groups(
        &mut self,
        members: usize,
        partitions: i32,
        max_in_flight: usize,
    ) -> Result<GroupsReport, BenchError> {
        let (events_topic, results_topic) = self.topics(partitions).await?;
        let group_id = format!("{}-group", self.prefix);
        let (group_event_id, group_key, group_payload) = group_created_event(&group_id, members);
        // A larger event would be dead-lettered, and the phase would wait for nothing.
        let max_event_bytes = crate::settings::PipelineSettings::default().max_event_bytes;
        if group_payload.len() > max_event_bytes {
            return Err(BenchError::Service(format!(
                "a group of {members} members is a {}-byte event, over pipeline.max_event_bytes ({max_event_bytes}): use fewer members",
                group_payload.len()
            )));
        }
        let max_members_per_request = serde_json::from_value::<Scim2Settings>(json!({}))
            .map_err(|error| BenchError::Service(format!("SCIM settings: {error}")))?
            .max_members_per_request;
        let producer = self.producer()?;
        let reader = self.results_reader(&results_topic, partitions)?;
        // The admin listener serves /metrics: the service's batch-size histogram.
        let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = self.write_config_with("user", true, &admin.to_string(), max_in_flight)?;
        let mut service = ServiceChild::start(&config)?;

        // The members first: a membership waits for its member's create, and A measures
        // the memberships, not the creates.
        let mut creating = std::collections::HashSet::with_capacity(members);
        for member in 0..members {
            let (id, key, payload) = group_member_created_event(member);
            producer
                .send_result(FutureRecord::to(&events_topic).key(&key).payload(&payload))
                .map_err(|(error, _)| error)?;
            creating.insert(id);
        }
        producer.flush(Timeout::After(Duration::from_secs(60)))?;
        let deadline = Instant::now() + PHASE_LIMIT;
        while !creating.is_empty() {
            let result = next_complete_result(&reader, deadline).await?;
            if creating.remove(&result.event_id) && result.status != Status::Succeeded {
                return Err(BenchError::Service(format!(
                    "the create of member `{}` did not succeed: {:?}",
                    result.user_id, result.results
                )));
            }
        }

        // A: the group's event, measured from its publication.
        let requests_before = self.emulator.control.stats.report().requests;
        let patches_before = self.emulator.group_patch_requests();
        let cpu_before = service.usage()?.0;
        let published_at = Instant::now();
        producer
            .send(
                FutureRecord::to(&events_topic).key(&group_key).payload(&group_payload),
                Timeout::After(Duration::from_secs(60)),
            )
            .await
            .map_err(|(error, _)| error)?;
        let mut seconds_to_group_result = None;
        let mut memberships = std::collections::HashSet::with_capacity(members);
        let mut memberships_added = 0usize;
        let deadline = Instant::now() + PHASE_LIMIT;
        while seconds_to_group_result.is_none() || memberships.len() < members {
            let result = next_complete_result(&reader, deadline).await?;
            if result.event_id != group_event_id {
                continue;
            }
            if result.user_id.is_empty() {
                // Without the group on the target no membership is written: stop here.
                if result.status != Status::Succeeded {
                    return Err(BenchError::Service(format!(
                        "the group's event did not succeed: {:?}",
                        result.results
                    )));
                }
                seconds_to_group_result = Some(published_at.elapsed().as_secs_f64());
                continue;
            }
            let added = !result.results.is_empty()
                && result
                    .results
                    .iter()
                    .all(|connector| connector.outcome == Outcome::MembersAdded);
            if memberships.insert(result.user_id) && added {
                memberships_added += 1;
            }
        }
        let seconds = published_at.elapsed().as_secs_f64();
        let cpu = service.usage()?.0.saturating_sub(cpu_before);
        let requests = self.emulator.control.stats.report().requests - requests_before;
        let group_patch_requests = self.emulator.group_patch_requests() - patches_before;
        // Only this phase touches groups, and B has not run yet: the emulator's maximum
        // is A's.
        let largest_batch = self.emulator.largest_group_membership_change();
        let answered: Vec<_> = self
            .emulator
            .control
            .requests()
            .into_iter()
            .filter(|request| request.at >= published_at)
            .collect();
        let group_requests = answered
            .iter()
            .filter(|request| request.path.ends_with("/Groups") && request.method != "PATCH")
            .count() as u64;
        let user_lookups = answered
            .iter()
            .filter(|request| request.path.ends_with("/Users") && request.method == "GET")
            .count() as u64;
        let metrics = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .map_err(|error| BenchError::Service(format!("metrics: {error}")))?
            .text()
            .await
            .map_err(|error| BenchError::Service(format!("metrics: {error}")))?;
        let batches = batch_size_buckets(&metrics);
        let batch_requests = metric_value(&metrics, "provisioner_membership_batch_size_count");
        let batch_members = metric_value(&metrics, "provisioner_membership_batch_size_sum");
        service.stop()?;
        let member_lanes = MemberLanesReport {
            requests,
            group_patch_requests,
            group_requests,
            user_lookups,
            other_requests: requests.saturating_sub(group_patch_requests + group_requests + user_lookups),
            largest_batch,
            mean_batch: batch_members / batch_requests.max(1.0),
            batches,
            seconds_to_group_result: seconds_to_group_result.unwrap_or_default(),
            seconds,
            memberships_added,
            memberships_other: members - memberships_added,
            members_on_target: self.members_on_target(&group_id),
            cpu_milliseconds: cpu.as_secs_f64() * 1000.0,
        };

        let group_lane = self.group_lane(members, max_in_flight, max_members_per_request).await?;
        Ok(GroupsReport {
            members,
            partitions,
            max_in_flight,
            max_members_per_request,
            member_lanes,
            group_lane,
        })
    }

    /// B: what the group's lane would do for a group of the groups phase's members,
    /// sent from here to the same emulator: create the group (look it up by
    /// `externalId`, then POST it, as the connector does), resolve every member with
    /// `GET /Users?filter=externalId eq "<id>"`, `max_in_flight` at once, then PATCH
    /// them in as the connector would, `max_members_per_request` per request. Each step
    /// is timed and its requests counted by the emulator.
    async fn group_lane(
        &self,
        members: usize,
        max_in_flight: usize,
        max_members_per_request: usize,
    ) -> Result<GroupLaneReport, BenchError> {
        use futures::StreamExt;
        let http = crate::connectors::http::build_client("bench", &Default::default())
            .map_err(|error| BenchError::Service(format!("HTTP client: {error}")))?;
        let requests = || self.emulator.control.stats.report().requests;
        let scim_url = &self.scim_url;
        let started = requests();

        let group_id = format!("{}-group-b", self.prefix);
        let group_started = Instant::now();
        let found = scim_call(http.get(format!("{scim_url}/Groups")).query(&[
            ("filter", format!("externalId eq {}", filter_literal(&group_id))),
            ("excludedAttributes", "members".to_string()),
        ]))
        .await?;
        if found["totalResults"].as_u64() != Some(0) {
            return Err(BenchError::Service(format!(
                "group `{group_id}` is already on the emulator"
            )));
        }
        let created = scim_call(http.post(format!("{scim_url}/Groups")).json(&json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": group_display_name(&group_id),
            "externalId": group_id,
        })))
        .await?;
        let group_seconds = group_started.elapsed().as_secs_f64();
        let group_remote_id = created["id"]
            .as_str()
            .ok_or_else(|| BenchError::Service(format!("the created group has no id: {created}")))?
            .to_string();
        let after_group = requests();

        let lookups_started = Instant::now();
        let resolved: Vec<Result<String, BenchError>> = futures::stream::iter(0..members)
            .map(|member| {
                let user_id = group_member_id(member);
                let lookup = http
                    .get(format!("{scim_url}/Users"))
                    .query(&[("filter", format!("externalId eq {}", filter_literal(&user_id)))]);
                async move {
                    let found = scim_call(lookup).await?;
                    found["Resources"][0]["id"]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| BenchError::Service(format!("member `{user_id}` not found on the emulator")))
                }
            })
            .buffer_unordered(max_in_flight)
            .collect()
            .await;
        let remote_ids = resolved.into_iter().collect::<Result<Vec<String>, BenchError>>()?;
        let lookup_seconds = lookups_started.elapsed().as_secs_f64();
        let after_lookups = requests();

        let patches_started = Instant::now();
        let group_url = format!("{scim_url}/Groups/{group_remote_id}");
        let patched: Vec<Result<serde_json::Value, BenchError>> =
            futures::stream::iter(remote_ids.chunks(max_members_per_request.max(1)))
                .map(|batch| {
                    let values: Vec<serde_json::Value> = batch.iter().map(|id| json!({"value": id})).collect();
                    scim_call(http.patch(&group_url).json(&json!({
                        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                        "Operations": [{"op": "add", "path": "members", "value": values}],
                    })))
                })
                .buffer_unordered(max_in_flight)
                .collect()
                .await;
        patched.into_iter().collect::<Result<Vec<_>, BenchError>>()?;
        let patch_seconds = patches_started.elapsed().as_secs_f64();
        let finished = requests();

        Ok(GroupLaneReport {
            requests: finished - started,
            group_requests: after_group - started,
            group_seconds,
            user_lookups: after_lookups - after_group,
            lookup_seconds,
            group_patch_requests: finished - after_lookups,
            patch_seconds,
            seconds: group_seconds + lookup_seconds + patch_seconds,
            members_on_target: self.members_on_target(&group_id),
        })
    }

    /// The members the emulator holds for the group with our display name for `group_id`.
    fn members_on_target(&self, group_id: &str) -> usize {
        self.emulator
            .group_by_display_name(&group_display_name(group_id))
            .and_then(|group| group["id"].as_str().map(str::to_string))
            .and_then(|id| self.emulator.group_member_ids(&id))
            .map_or(0, |ids| ids.len())
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

/// The next complete result on the results topic (replies, queued notices and
/// undecodable records are passed over). An error when none comes for
/// [`RESULT_SILENCE_LIMIT`] or `deadline` has passed.
async fn next_complete_result(reader: &StreamConsumer, deadline: Instant) -> Result<ProvisioningResult, BenchError> {
    loop {
        if Instant::now() > deadline {
            return Err(BenchError::Service(format!(
                "the phase took over {} s",
                PHASE_LIMIT.as_secs()
            )));
        }
        let message = tokio::time::timeout(RESULT_SILENCE_LIMIT, reader.recv())
            .await
            .map_err(|_| BenchError::Service(format!("no result for {} s", RESULT_SILENCE_LIMIT.as_secs())))??;
        let result = message
            .payload()
            .and_then(|payload| serde_json::from_slice::<ProvisioningResult>(payload).ok());
        if let Some(result) = result.filter(|result| result.scope == ResultScope::Complete) {
            return Ok(result);
        }
    }
}

/// One SCIM request of B: its JSON answer, or an error naming the status.
async fn scim_call(request: reqwest::RequestBuilder) -> Result<serde_json::Value, BenchError> {
    let response = request
        .send()
        .await
        .map_err(|error| BenchError::Service(format!("SCIM emulator: {error}")))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(BenchError::Service(format!("SCIM emulator answered {status}: {body}")));
    }
    // A PATCH may answer 204 without a body.
    Ok(serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

/// The sum of every sample of a Prometheus metric whose line starts with `name`.
fn metric_value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse::<f64>().ok()))
        .sum()
}

/// The service's membership batch-size histogram, per bucket rather than cumulative.
fn batch_size_buckets(metrics: &str) -> Vec<BatchSizeBucket> {
    let cumulative: Vec<(f64, u64)> = metrics
        .lines()
        .filter(|line| line.starts_with("provisioner_membership_batch_size_bucket{"))
        .filter_map(|line| {
            let bound = line.split("le=\"").nth(1)?.split('"').next()?.parse::<f64>().ok()?;
            let count = line.rsplit_once(' ')?.1.parse::<f64>().ok()?;
            Some((bound, count as u64))
        })
        .collect();
    let mut below = 0;
    let mut buckets = Vec::new();
    for (at_most, count) in cumulative {
        if count > below {
            buckets.push(BatchSizeBucket {
                at_most,
                requests: count - below,
            });
        }
        below = count;
    }
    buckets
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
    let user_name = bench_user_name(index, users);
    let (event_type, verb) = if index.is_multiple_of(2) {
        ("user.created", "c")
    } else {
        ("user.deleted", "d")
    };
    let id = format!("b{index}{verb}");
    let user_id = format!("bench-user-{user}");
    let payload = serde_json::to_vec(&json!({
        "specversion": "1.0", "id": id, "source": "/bench", "type": event_type,
        "data": {"tenant": "bench", "user": {"id": user_id, "userName": user_name,
                 "name": {"givenName": "Bench", "familyName": format!("User{user}")},
                 "emails": [{"value": format!("user{user}@example.com"), "primary": true}]}}
    }))
    .expect("JSON");
    (id, format!("bench/{user_id}"), payload)
}

/// The `userName` of event `index`'s user.
fn bench_user_name(index: usize, users: usize) -> String {
    format!("user{}", (index / 2) % users)
}

/// The groups phase's member `member`: its own user id, so earlier phases' users (created
/// and deleted on the same emulator) are not in the way.
fn group_member_id(member: usize) -> String {
    format!("bench-member-{member}")
}

/// The create of the groups phase's member `member`.
fn group_member_created_event(member: usize) -> (String, String, Vec<u8>) {
    let id = format!("m{member}c");
    let user_id = group_member_id(member);
    let payload = serde_json::to_vec(&json!({
        "specversion": "1.0", "id": id, "source": "/bench", "type": "user.created",
        "data": {"tenant": "bench", "user": {"id": user_id, "userName": format!("member{member}"),
                 "name": {"givenName": "Bench", "familyName": format!("Member{member}")},
                 "emails": [{"value": format!("member{member}@example.com"), "primary": true}]}}
    }))
    .expect("JSON");
    (id, format!("bench/{user_id}"), payload)
}

fn group_display_name(group_id: &str) -> String {
    format!("Bench {group_id}")
}

/// One `group.created` event with members 0..`members`, keyed `tenant/group:<id>`.
fn group_created_event(group_id: &str, members: usize) -> (String, String, Vec<u8>) {
    let id = format!("{group_id}-created");
    let member_ids: Vec<String> = (0..members).map(group_member_id).collect();
    let payload = serde_json::to_vec(&json!({
        "specversion": "1.0", "id": id, "source": "/bench", "type": "group.created",
        "data": {"tenant": "bench", "group": {"id": group_id, "displayName": group_display_name(group_id),
                 "members": member_ids}}
    }))
    .expect("JSON");
    (id, format!("bench/group:{group_id}"), payload)
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
        let config = config
            .to_str()
            .ok_or_else(|| BenchError::Service("a non-UTF-8 temporary path".into()))?;
        ServiceChild::spawn(&["run", "--config", config])
    }

    /// This program with these arguments.
    fn spawn(args: &[&str]) -> Result<ServiceChild, BenchError> {
        let child = Command::new(std::env::current_exe()?)
            .args(args)
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
    out.push_str(&format!(
        "provisioner bench — target latency {} ms, {} cores\n\n",
        report.target_latency_ms, report.machine_cores
    ));
    if let Some(throughput) = &report.throughput {
        out.push_str(&format!(
            "  throughput          {:>10.0} events/s  ({} events, {} users, {} partitions, {:.1} s)\n",
            throughput.events_per_second,
            throughput.events,
            throughput.users,
            throughput.partitions,
            throughput.seconds
        ));
        out.push_str(&format!(
            "  CPU per event       {:>10.1} µs        (service process only: user+sys from /proc)\n",
            throughput.cpu_microseconds_per_event
        ));
        out.push_str(&format!(
            "  peak RSS            {:>10.1} MiB\n",
            throughput.peak_rss_mib
        ));
    }
    if let Some(baseline) = &report.baseline {
        out.push_str(&format!(
            "  sequential baseline {:>10.0} events/s  (one in flight per partition, {} events)\n",
            baseline.events_per_second, baseline.events
        ));
    }
    // No speed-up without the throughput phase (--events 0).
    if let Some(speedup) = report.speedup_over_baseline {
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
            "    target's own      p50 {:.2} ms  p99 {:.2} ms   (measured by the emulator; {} calls unmeasured)\n",
            latency.target_ms_p50, latency.target_ms_p99, latency.events_without_measured_target
        ));
        out.push_str(&format!(
            "    CPU per event     {:.1} µs\n",
            latency.cpu_microseconds_per_event
        ));
    }
    if let (Some(throughput), Some(without)) = (&report.throughput, &report.without_state) {
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
    if let Some(floor) = &report.floor {
        out.push_str("  floor (the same reads, target call and acknowledged writes, and no other work):\n");
        if let Some(throughput) = &floor.throughput {
            out.push_str(&format!(
                "    throughput        {:>10.0} events/s, {:.1} µs CPU per event, peak RSS {:.1} MiB\n",
                throughput.events_per_second, throughput.cpu_microseconds_per_event, throughput.peak_rss_mib
            ));
            if let Some(service) = &report.throughput {
                out.push_str(&format!(
                    "    the service's own {:>10.1} µs CPU per event above the floor ({:.2}× the floor)\n",
                    service.cpu_microseconds_per_event - throughput.cpu_microseconds_per_event,
                    service.cpu_microseconds_per_event / throughput.cpu_microseconds_per_event.max(f64::MIN_POSITIVE)
                ));
            }
        }
        if let Some(latency) = &floor.latency {
            out.push_str(&format!(
                "    overhead          p50 {:.2} ms  p99 {:.2} ms at {} events/s; CPU per event {:.1} µs\n",
                latency.overhead_ms_p50,
                latency.overhead_ms_p99,
                latency.offered_events_per_second,
                latency.cpu_microseconds_per_event
            ));
        }
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
    if let Some(groups) = &report.groups {
        let a = &groups.member_lanes;
        let b = &groups.group_lane;
        out.push_str(&format!(
            "  groups ({} members, {} partitions, {} requests in flight, {} members per PATCH at most):\n",
            groups.members, groups.partitions, groups.max_in_flight, groups.max_members_per_request
        ));
        out.push_str(&format!(
            "    A — {} requests ({} PATCH, {} for the group itself, {} user lookups, {} other), {:.2} s  (members' lanes, what the service does: publish to the last membership's result)\n",
            a.requests, a.group_patch_requests, a.group_requests, a.user_lookups, a.other_requests, a.seconds
        ));
        let batches: Vec<String> = a
            .batches
            .iter()
            .map(|bucket| format!("≤{}: {}", bucket.at_most, bucket.requests))
            .collect();
        out.push_str(&format!(
            "        group's result after {:.2} s; batches: largest {}, mean {:.1} members, requests by size {}; {} of {} memberships added, {} on the target; service CPU {:.0} ms\n",
            a.seconds_to_group_result,
            a.largest_batch,
            a.mean_batch,
            batches.join(", "),
            a.memberships_added,
            groups.members,
            a.members_on_target,
            a.cpu_milliseconds
        ));
        out.push_str(&format!(
            "    B — {} requests ({} lookups, {} PATCH, {} for the group itself), {:.2} s  (group's lane resolving members: the target's calls alone, a lower bound)\n",
            b.requests, b.user_lookups, b.group_patch_requests, b.group_requests, b.seconds
        ));
        out.push_str(&format!(
            "        group {:.2} s + lookups {:.2} s + PATCH {:.2} s; {} on the target\n",
            b.group_seconds, b.lookup_seconds, b.patch_seconds, b.members_on_target
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
