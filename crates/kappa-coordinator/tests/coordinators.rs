//! Group membership, committed offsets and transactions against a real log on disk.

use std::sync::Arc;
use std::time::Duration;

use kappa_coordinator::{
    CommittedOffset, GroupConfig, GroupCoordinator, GroupError, JoinRequest, OffsetStore, SyncRequest, TxnConfig,
    TxnCoordinator, TxnError,
};
use kappa_log::clock::ManualClock;
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Isolation, Log, LogOptions};

fn join_request(group: &str, member: &str) -> JoinRequest {
    JoinRequest {
        group_id: group.to_owned(),
        member_id: member.to_owned(),
        group_instance_id: None,
        client_id: "test".to_owned(),
        client_host: "/127.0.0.1".to_owned(),
        session_timeout_ms: 10_000,
        rebalance_timeout_ms: 10_000,
        protocol_type: "consumer".to_owned(),
        protocols: vec![("range".to_owned(), b"meta".to_vec()), ("roundrobin".to_owned(), b"rr".to_vec())],
        require_known_member_id: false,
    }
}

fn coordinator() -> GroupCoordinator {
    GroupCoordinator::new(GroupConfig { initial_rebalance_delay_ms: 0, ..GroupConfig::default() })
}

/// Members starting together land in one first generation thanks to the initial delay.
fn coordinator_with_initial_delay() -> GroupCoordinator {
    GroupCoordinator::new(GroupConfig { initial_rebalance_delay_ms: 100, ..GroupConfig::default() })
}

#[tokio::test]
async fn two_members_join_sync_and_a_third_triggers_a_rebalance() {
    let groups = coordinator_with_initial_delay();
    let (a, b) = tokio::join!(groups.join(join_request("g", "")), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        groups.join(join_request("g", "")).await
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.generation_id, b.generation_id), (1, 1), "generations start at 1");
    assert_eq!(a.protocol_name, "range");
    let (leader, follower) = if a.leader == a.member_id { (a, b) } else { (b, a) };
    assert_eq!(leader.members.len(), 2, "the leader gets the roster");
    assert!(follower.members.is_empty());

    let sync = |member: &str, assignments: Vec<(String, Vec<u8>)>, generation| SyncRequest {
        group_id: "g".to_owned(),
        generation_id: generation,
        member_id: member.to_owned(),
        group_instance_id: None,
        assignments,
    };
    let generation = leader.generation_id;
    let assignments = vec![(leader.member_id.clone(), b"L".to_vec()), (follower.member_id.clone(), b"F".to_vec())];
    let (l, f) = tokio::join!(groups.sync(sync(&leader.member_id, assignments, generation)), async {
        groups.sync(sync(&follower.member_id, vec![], generation)).await
    });
    assert_eq!((l.unwrap(), f.unwrap()), (b"L".to_vec(), b"F".to_vec()));
    groups.heartbeat("g", generation, &follower.member_id, None).unwrap();
    assert_eq!(groups.heartbeat("g", generation - 1, &follower.member_id, None), Err(GroupError::IllegalGeneration));

    // A third member: the others learn of the rebalance through their heartbeat.
    let third = tokio::spawn({
        let groups = groups.clone();
        async move { groups.join(join_request("g", "")).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(groups.heartbeat("g", generation, &leader.member_id, None), Err(GroupError::RebalanceInProgress));
    let (l2, f2) = tokio::join!(
        groups.join(join_request("g", &leader.member_id)),
        groups.join(join_request("g", &follower.member_id))
    );
    let third = third.await.unwrap().unwrap();
    assert_eq!(l2.unwrap().generation_id, generation + 1);
    assert_eq!(f2.unwrap().generation_id, generation + 1);
    assert_eq!(third.generation_id, generation + 1);

    groups.leave("g", &third.member_id, None).unwrap();
    assert_eq!(groups.group_state("g").unwrap().0.name(), "PreparingRebalance");
}

#[tokio::test]
async fn member_id_required_static_membership_and_session_expiry() {
    let groups = coordinator();
    let mut first = join_request("g", "");
    first.require_known_member_id = true;
    let Err(GroupError::MemberIdRequired(id)) = groups.join(first.clone()).await else {
        panic!("v4 first join must ask for a member id")
    };
    assert_eq!(groups.join(join_request("g", "made-up")).await, Err(GroupError::UnknownMemberId));
    let joined = groups.join(join_request("g", &id)).await.unwrap();
    assert_eq!(joined.member_id, id);

    let mut stat = join_request("s", "");
    stat.group_instance_id = Some("instance-1".to_owned());
    stat.session_timeout_ms = 1_000;
    let one = groups.join(stat.clone()).await.unwrap();
    let two = groups.join(stat.clone()).await.unwrap();
    assert_ne!(one.member_id, two.member_id, "a static member rejoining gets a new member id");
    assert_eq!(
        groups.heartbeat("s", two.generation_id, &one.member_id, Some("instance-1")),
        Err(GroupError::FencedInstanceId)
    );

    // Without heartbeats the session expires; the emptied group is forgotten.
    let generation = two.generation_id;
    let sync = SyncRequest {
        group_id: "s".into(),
        generation_id: generation,
        member_id: two.member_id.clone(),
        group_instance_id: Some("instance-1".into()),
        assignments: vec![(two.member_id.clone(), b"a".to_vec())],
    };
    groups.sync(sync).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    groups.expire_sessions();
    assert_eq!(groups.group_state("s"), None);
    assert_eq!(groups.describe("s").state, "Dead");
    assert_eq!(groups.delete("s"), Err(GroupError::GroupIdNotFound));
    assert_eq!(groups.delete("g"), Err(GroupError::NonEmptyGroup));
}

/// A heartbeat from another generation is refused and does not keep the member's session
/// alive (Kafka refreshes the session only for a heartbeat of the current generation).
#[tokio::test(start_paused = true)]
async fn heartbeats_from_another_generation_do_not_keep_a_session_alive() {
    let groups = coordinator();
    let mut request = join_request("h", "");
    request.session_timeout_ms = 1_000;
    let joined = groups.join(request).await.unwrap();
    let member = joined.member_id.clone();
    let assignments = vec![(member.clone(), b"a".to_vec())];
    let sync = SyncRequest {
        group_id: "h".into(),
        generation_id: joined.generation_id,
        member_id: member.clone(),
        group_instance_id: None,
        assignments,
    };
    groups.sync(sync).await.unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let stale = groups.heartbeat("h", joined.generation_id + 1, &member, None);
        assert_eq!(stale, Err(GroupError::IllegalGeneration));
    }
    groups.expire_sessions();
    assert_eq!(groups.group_state("h"), None, "the session expired: stale heartbeats do not count");
}

#[tokio::test(start_paused = true)]
async fn emptied_groups_and_unused_member_ids_do_not_count_against_groups_max() {
    let groups =
        GroupCoordinator::new(GroupConfig { initial_rebalance_delay_ms: 0, groups_max: 2, ..GroupConfig::default() });
    // "a": its only member left. "b": a v4 first join that never came back with its id.
    let a = groups.join(join_request("a", "")).await.unwrap();
    groups.leave("a", &a.member_id, None).unwrap();
    let mut first = join_request("b", "");
    first.require_known_member_id = true;
    first.session_timeout_ms = 10_000;
    let Err(GroupError::MemberIdRequired(unused)) = groups.join(first).await else {
        panic!("v4 first join must ask for a member id")
    };

    // "a" is idle, so "c" fits; "b" holds a member id until its session timeout, so "d" does not.
    let mut c = join_request("c", "");
    c.session_timeout_ms = 60_000;
    groups.join(c).await.unwrap();
    assert_eq!(groups.group_state("a"), None, "the emptied group was forgotten");
    assert_eq!(groups.join(join_request("d", "")).await, Err(GroupError::CoordinatorFull { groups_max: 2 }));

    tokio::time::advance(Duration::from_millis(10_001)).await;
    groups.expire_sessions();
    assert_eq!(groups.group_state("b"), None, "the unused member id expired, and its group with it");
    assert_eq!(groups.join(join_request("b", &unused)).await, Err(GroupError::UnknownMemberId));
    groups.join(join_request("d", "")).await.unwrap();
    assert_eq!(groups.group_state("c").map(|(state, _)| state.name()), Some("CompletingRebalance"));
}

fn open_log(dir: &std::path::Path, clock: &ManualClock) -> Arc<Log> {
    let options = LogOptions { clock: Arc::new(clock.clone()), ..LogOptions::default() };
    Arc::new(Log::open(dir, options).unwrap().0)
}

/// A log at ms 1 000 with a topic `out`, its offset store and a transaction coordinator.
struct TxnFixture {
    _dir: tempfile::TempDir,
    clock: ManualClock,
    log: Arc<Log>,
    offsets: Arc<OffsetStore>,
    txns: Arc<TxnCoordinator>,
}

impl TxnFixture {
    async fn open(config: TxnConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000);
        let log = open_log(dir.path(), &clock);
        log.create_topic("out", 1, &Default::default()).unwrap();
        let offsets = Arc::new(OffsetStore::open(&log).unwrap());
        let txns = TxnCoordinator::open(log.clone(), offsets.clone(), config).await.unwrap();
        Self { _dir: dir, clock, log, offsets, txns }
    }
}

/// KIP-360: a client whose InitProducerId answer was lost retries with the epoch it held and
/// gets the same answer — until a transaction starts under the new epoch, after which that
/// old epoch is fenced.
#[tokio::test]
async fn a_retried_init_producer_id_gets_the_same_epoch_until_a_transaction_starts() {
    let TxnFixture { _dir, txns, .. } = TxnFixture::open(TxnConfig::default()).await;
    let (pid, first) = txns.init_producer_id(Some("tx"), 60_000, None).await.unwrap();
    let bumped = txns.init_producer_id(Some("tx"), 60_000, Some((pid, first))).await.unwrap();
    assert_eq!(bumped, (pid, first + 1));
    let retried = txns.init_producer_id(Some("tx"), 60_000, Some((pid, first))).await;
    assert_eq!(retried.unwrap(), bumped, "the lost answer, again; no second bump");
    txns.add_partitions("tx", pid, first + 1, &[("out".to_owned(), 0)]).await.unwrap();
    let stale = txns.init_producer_id(Some("tx"), 60_000, Some((pid, first))).await;
    assert!(matches!(stale, Err(TxnError::ProducerFenced)), "{stale:?}");
    // A new instance's InitProducerId (no epoch held) fences the old one for good: the old
    // instance's "retry" is not one.
    let (_, held) = txns.init_producer_id(Some("tx"), 60_000, Some((pid, first + 1))).await.unwrap();
    let (_, newer) = txns.init_producer_id(Some("tx"), 60_000, None).await.unwrap();
    assert_eq!(newer, held + 1);
    let zombie = txns.init_producer_id(Some("tx"), 60_000, Some((pid, held))).await;
    assert!(matches!(zombie, Err(TxnError::ProducerFenced)), "{zombie:?}");
}

fn offset(value: i64) -> CommittedOffset {
    CommittedOffset { offset: value, leader_epoch: -1, metadata: String::new(), commit_timestamp: 1 }
}

#[tokio::test]
async fn committed_offsets_survive_a_restart_and_deletes_stick() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    {
        let log = open_log(dir.path(), &clock);
        let store = OffsetStore::open(&log).unwrap();
        store.commit("g1", vec![(("t".into(), 0), offset(5)), (("t".into(), 1), offset(7))]).await.unwrap();
        store.commit("g1", vec![(("t".into(), 0), offset(9))]).await.unwrap();
        store.commit("g2", vec![(("t".into(), 0), offset(1))]).await.unwrap();
        store.delete("g2", None).await.unwrap();
        let too_big = CommittedOffset { metadata: "x".repeat(5000), ..offset(1) };
        assert!(matches!(
            store.commit("g1", vec![(("t".into(), 0), too_big)]).await,
            Err(GroupError::MetadataTooLarge { .. })
        ));
    }
    let log = open_log(dir.path(), &clock);
    let store = OffsetStore::open(&log).unwrap();
    let fetched = store.fetch("g1", None);
    assert_eq!(fetched, vec![(("t".into(), 0), Some(offset(9))), (("t".into(), 1), Some(offset(7)))]);
    assert!(store.fetch("g2", None).is_empty());
    assert_eq!(store.fetch("g1", Some(&[("other".into(), 0)])), vec![(("other".into(), 0), None)]);
}

#[tokio::test]
async fn transactions_write_markers_fence_zombies_and_commit_offsets_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let log = open_log(dir.path(), &clock);
    log.create_topic("out", 2, &Default::default()).unwrap();
    let offsets = Arc::new(OffsetStore::open(&log).unwrap());
    let txns = TxnCoordinator::open(log.clone(), offsets.clone(), TxnConfig::default()).await.unwrap();

    let (pid, epoch) = txns.init_producer_id(Some("tx"), 60_000, None).await.unwrap();
    assert_eq!(epoch, 0);
    txns.add_partitions("tx", pid, epoch, &[("out".into(), 0), ("out".into(), 1)]).await.unwrap();
    let p0 = log.partition("out", 0).unwrap();
    let data = BatchBuilder::new()
        .producer(pid, epoch, 0)
        .transactional(true)
        .record(NewRecord::new(Some(b"k"), Some(b"v"), 1))
        .build();
    p0.append(data).unwrap();
    txns.add_offsets("tx", pid, epoch).await.unwrap();
    txns.check_offset_commit("tx", pid, epoch).await.unwrap();
    offsets.commit_transactional(pid, epoch, "g", vec![(("in".into(), 0), offset(42))]).await.unwrap();
    assert_eq!(offsets.fetch("g", None), vec![], "not visible before the commit");
    assert_eq!(p0.last_stable_offset(), 0, "the open transaction holds the LSO");

    txns.end("tx", pid, epoch, true).await.unwrap();
    assert_eq!(p0.last_stable_offset(), 2, "data + commit marker are stable");
    assert_eq!(offsets.fetch("g", None), vec![(("in".into(), 0), Some(offset(42)))]);
    txns.end("tx", pid, epoch, true).await.unwrap();
    assert!(matches!(txns.end("tx", pid, epoch, false).await, Err(TxnError::InvalidTxnState(_))));

    // A second transaction left open, then a new instance fences the zombie and aborts it.
    txns.add_partitions("tx", pid, epoch, &[("out".into(), 1)]).await.unwrap();
    let p1 = log.partition("out", 1).unwrap();
    p1.append(
        BatchBuilder::new()
            .producer(pid, epoch, 0)
            .transactional(true)
            .record(NewRecord::new(Some(b"k"), Some(b"z"), 1))
            .build(),
    )
    .unwrap();
    let (pid2, epoch2) = txns.init_producer_id(Some("tx"), 60_000, None).await.unwrap();
    assert_eq!((pid2, epoch2), (pid, epoch + 1));
    assert_eq!(txns.add_partitions("tx", pid, epoch, &[("out".into(), 1)]).await, Err(TxnError::ProducerFenced));
    let read = p1.read(0, 1 << 20, Isolation::ReadCommitted).unwrap();
    assert_eq!(read.aborted.len(), 1, "the zombie's transaction was aborted");
    assert!(
        p1.append(
            BatchBuilder::new()
                .producer(pid, epoch, 1)
                .transactional(true)
                .record(NewRecord::new(None, Some(b"late"), 1))
                .build()
        )
        .is_err(),
        "the log fences the old epoch too"
    );

    // Transaction timeout: an abandoned transaction is aborted by the coordinator.
    txns.add_partitions("tx", pid2, epoch2, &[("out".into(), 0)]).await.unwrap();
    clock.advance(61_000);
    assert_eq!(txns.abort_expired().await, 1);
    assert_eq!(txns.add_partitions("tx", pid2, epoch2, &[("out".into(), 0)]).await, Err(TxnError::ProducerFenced));
}

#[tokio::test]
async fn producer_ids_stay_unique_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let log = open_log(dir.path(), &clock);
        let offsets = Arc::new(OffsetStore::open(&log).unwrap());
        let txns = TxnCoordinator::open(log.clone(), offsets, TxnConfig::default()).await.unwrap();
        for _ in 0..5 {
            let (pid, epoch) = txns.init_producer_id(None, 60_000, None).await.unwrap();
            assert_eq!(epoch, 0);
            assert!(seen.insert(pid), "producer id {pid} handed out twice");
        }
    }
}

/// Kafka's transactional.id.expiration.ms: an id with no transaction for that long is
/// tombstoned and forgotten (also after a restart); one in a transaction, one used since,
/// and kappa's reserved ids stay. A forgotten id starts afresh with a new producer id.
#[tokio::test]
async fn idle_transactional_ids_expire_and_start_afresh() {
    let config = TxnConfig { id_expiration_ms: 10_000, ..TxnConfig::default() };
    let TxnFixture { _dir, clock, log, offsets, txns } = TxnFixture::open(config.clone()).await;

    let (idle_pid, idle_epoch) = txns.init_producer_id(Some("idle"), 60_000, None).await.unwrap();
    txns.add_partitions("idle", idle_pid, idle_epoch, &[("out".into(), 0)]).await.unwrap();
    txns.end("idle", idle_pid, idle_epoch, true).await.unwrap();
    let (busy_pid, busy_epoch) = txns.init_producer_id(Some("busy"), 60_000, None).await.unwrap();
    let (kappa_pid, _) = txns.init_producer_id(Some("__kappa.http.0"), 60_000, None).await.unwrap();
    let (recent_pid, recent_epoch) = txns.init_producer_id(Some("recent"), 60_000, None).await.unwrap();

    clock.advance(9_000);
    assert_eq!(txns.expire_transactional_ids().await, Vec::<String>::new(), "nothing idle for 10 s yet");
    // "busy" opens a transaction (it is aborted by its timeout, not expired); "recent"
    // completes one, which restarts its idle time.
    txns.add_partitions("busy", busy_pid, busy_epoch, &[("out".into(), 0)]).await.unwrap();
    txns.add_partitions("recent", recent_pid, recent_epoch, &[("out".into(), 0)]).await.unwrap();
    txns.end("recent", recent_pid, recent_epoch, false).await.unwrap();
    clock.advance(1_000);
    assert_eq!(txns.expire_transactional_ids().await, vec!["idle".to_owned()]);
    assert!(!txns.knows("idle") && txns.knows("busy") && txns.knows("recent") && txns.knows("__kappa.http.0"));
    assert_eq!(
        txns.end("idle", idle_pid, idle_epoch, true).await,
        Err(TxnError::InvalidProducerIdMapping),
        "a forgotten id's old producer is unknown"
    );
    clock.advance(20_000);
    let mut expired = txns.expire_transactional_ids().await;
    expired.sort();
    assert_eq!(expired, vec!["recent".to_owned()], "an open transaction and kappa's own ids never expire");

    // More idle ids than one batch of tombstones holds.
    let many: Vec<String> =
        (0..kappa_coordinator::txn::EXPIRED_IDS_PER_BATCH + 20).map(|i| format!("many-{i}")).collect();
    for id in &many {
        txns.init_producer_id(Some(id), 60_000, None).await.unwrap();
    }
    clock.advance(10_000);
    let mut expired = txns.expire_transactional_ids().await;
    expired.sort();
    let mut expected = many.clone();
    expected.sort();
    assert_eq!(expired, expected);
    drop(txns);

    // After a restart the tombstones still hold; a forgotten id is initialised afresh.
    let txns = TxnCoordinator::open(log.clone(), offsets, config).await.unwrap();
    assert!(!txns.knows("idle") && !txns.knows("recent") && txns.knows("busy") && txns.knows("__kappa.http.0"));
    assert!(many.iter().all(|id| !txns.knows(id)));
    // The client still holds its old producer id and epoch (KIP-360 clients send them): a
    // forgotten id accepts that and hands out a new producer id.
    let (pid, epoch) = txns.init_producer_id(Some("idle"), 60_000, Some((idle_pid, idle_epoch))).await.unwrap();
    assert_eq!(epoch, 0);
    assert!(pid != idle_pid && pid != busy_pid && pid != kappa_pid && pid != recent_pid, "a new producer id");
    txns.add_partitions("idle", pid, epoch, &[("out".into(), 0)]).await.unwrap();
    txns.end("idle", pid, epoch, true).await.unwrap();
}

/// `ids_max`: past it, the expiry pass forgets the ids idle longest, down to nine tenths of
/// it, before their expiration time — never one in a transaction or one of kappa's own — and
/// the forgetting holds after a restart.
#[tokio::test]
async fn past_ids_max_the_ids_idle_longest_are_forgotten_early() {
    let config = TxnConfig { ids_max: 10, ..TxnConfig::default() };
    let TxnFixture { _dir, clock, log, offsets, txns } = TxnFixture::open(config.clone()).await;

    // The oldest two: one in a transaction, one of kappa's own.
    let (busy_pid, busy_epoch) = txns.init_producer_id(Some("busy"), 60_000, None).await.unwrap();
    txns.add_partitions("busy", busy_pid, busy_epoch, &[("out".into(), 0)]).await.unwrap();
    txns.init_producer_id(Some("__kappa.http.0"), 60_000, None).await.unwrap();
    let ids: Vec<String> = (0..12).map(|i| format!("id-{i:02}")).collect();
    for id in &ids {
        clock.advance(10);
        txns.init_producer_id(Some(id), 60_000, None).await.unwrap();
    }
    // id-00 completes a transaction last: no longer the one idle longest.
    let (pid0, epoch0) = txns.init_producer_id(Some("id-00"), 60_000, None).await.unwrap();
    txns.add_partitions("id-00", pid0, epoch0, &[("out".into(), 0)]).await.unwrap();
    txns.end("id-00", pid0, epoch0, true).await.unwrap();

    assert!(txns.over_ids_max(), "14 ids known, 10 allowed");
    let mut forgotten = txns.expire_transactional_ids().await;
    forgotten.sort();
    assert_eq!(forgotten, ["id-01", "id-02", "id-03", "id-04", "id-05"], "down to 9 = nine tenths of 10");
    assert!(!txns.over_ids_max());
    assert!(txns.knows("busy") && txns.knows("__kappa.http.0") && txns.knows("id-00") && txns.knows("id-06"));
    assert_eq!(txns.expire_transactional_ids().await, Vec::<String>::new(), "at or under the limit: nothing");
    drop(txns);

    let txns = TxnCoordinator::open(log.clone(), offsets, config).await.unwrap();
    assert!(!txns.knows("id-01") && txns.knows("id-11") && txns.knows("busy"));
    let (pid, epoch) = txns.init_producer_id(Some("id-01"), 60_000, None).await.unwrap();
    assert_eq!(epoch, 0, "a forgotten id starts afresh");
    txns.add_partitions("id-01", pid, epoch, &[("out".into(), 0)]).await.unwrap();
    txns.end("id-01", busy_pid, busy_epoch, true).await.expect_err("another id's producer is not this id's");

    // Over the limit with nothing to forget (ids in transactions): the broker's every-second
    // check backs off for a minute instead of redoing the pass.
    let TxnFixture { _dir, clock, txns, .. } = TxnFixture::open(TxnConfig { ids_max: 1, ..TxnConfig::default() }).await;
    for id in ["a", "b"] {
        let (pid, epoch) = txns.init_producer_id(Some(id), 60_000, None).await.unwrap();
        txns.add_partitions(id, pid, epoch, &[("out".into(), 0)]).await.unwrap();
    }
    assert!(txns.over_ids_max());
    assert_eq!(txns.expire_transactional_ids().await, Vec::<String>::new());
    assert!(!txns.over_ids_max(), "the pass could not help: no early pass for a minute");
    clock.advance(60_000);
    assert!(txns.over_ids_max());
}

fn static_request(group: &str, member: &str, instance: &str) -> JoinRequest {
    JoinRequest { group_instance_id: Some(instance.to_owned()), ..join_request(group, member) }
}

fn sync_request(member: &str, generation: i32, assignments: Vec<(String, Vec<u8>)>) -> SyncRequest {
    SyncRequest {
        group_id: "g".to_owned(),
        generation_id: generation,
        member_id: member.to_owned(),
        group_instance_id: None,
        assignments,
    }
}

#[tokio::test(start_paused = true)]
async fn a_restarted_static_member_keeps_the_generation_and_its_leadership() {
    let groups = coordinator();
    let a = groups.join(static_request("g", "", "a")).await.unwrap();
    let (b, a) = tokio::join!(groups.join(join_request("g", "")), groups.join(static_request("g", &a.member_id, "a")));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.leader, a.member_id);
    let generation = a.generation_id;
    let assignments = vec![(a.member_id.clone(), b"A".to_vec()), (b.member_id.clone(), b"B".to_vec())];
    let (synced_a, synced_b) = tokio::join!(
        groups.sync(sync_request(&a.member_id, generation, assignments)),
        groups.sync(sync_request(&b.member_id, generation, vec![]))
    );
    assert_eq!((synced_a.unwrap(), synced_b.unwrap()), (b"A".to_vec(), b"B".to_vec()));

    // The instance restarts: no member id, and new metadata (librdkafka's owned partitions).
    let mut restart = static_request("g", "", "a");
    restart.protocols = vec![("range".to_owned(), b"owns p0".to_vec()), ("roundrobin".to_owned(), b"rr".to_vec())];
    let restarted = groups.join(restart.clone()).await.unwrap();
    assert_ne!(restarted.member_id, a.member_id);
    assert_eq!(restarted.generation_id, generation, "the protocol is still range: no rebalance");
    assert_eq!(restarted.leader, a.member_id, "told the old leader id, so it assigns nothing");
    assert_eq!(groups.heartbeat("g", generation, &b.member_id, None), Ok(()));
    assert_eq!(groups.heartbeat("g", generation, &a.member_id, Some("a")), Err(GroupError::FencedInstanceId));
    assert_eq!(groups.sync(sync_request(&restarted.member_id, generation, vec![])).await.unwrap(), b"A".to_vec());

    // It is still the leader, under its new id: its rejoin rebalances and it gets the roster.
    let rejoin = tokio::spawn({
        let groups = groups.clone();
        let request = static_request("g", &restarted.member_id, "a");
        async move { groups.join(JoinRequest { protocols: restart.protocols, ..request }).await }
    });
    tokio::task::yield_now().await;
    assert_eq!(groups.heartbeat("g", generation, &b.member_id, None), Err(GroupError::RebalanceInProgress));
    groups.join(join_request("g", &b.member_id)).await.unwrap();
    let rejoined = rejoin.await.unwrap().unwrap();
    assert_eq!((rejoined.generation_id, rejoined.leader.as_str()), (generation + 1, restarted.member_id.as_str()));
    assert_eq!(rejoined.members.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn static_members_that_miss_a_rebalance_stay_until_their_session_expires() {
    let groups = coordinator();
    let a = groups.join(static_request("g", "", "a")).await.unwrap();
    groups.sync(sync_request(&a.member_id, a.generation_id, vec![(a.member_id.clone(), b"A".to_vec())])).await.unwrap();

    // b joins; a does not rejoin within the rebalance timeout (the paused clock jumps there).
    let b = groups.join(join_request("g", "")).await.unwrap();
    assert_eq!(b.generation_id, a.generation_id + 1);
    assert_eq!(b.leader, b.member_id, "the leader is a member that rejoined");
    let mut roster: Vec<_> = b.members.iter().map(|(id, _, _)| id.clone()).collect();
    roster.sort();
    let mut expected = vec![a.member_id.clone(), b.member_id.clone()];
    expected.sort();
    assert_eq!(roster, expected, "a is still a member");
    assert_eq!(
        groups.heartbeat("g", a.generation_id, &a.member_id, Some("a")),
        Err(GroupError::IllegalGeneration),
        "a is known, only its generation is old"
    );

    // b leaves: only a is left and it does not rejoin, so the next generation waits.
    groups.leave("g", &b.member_id, None).unwrap();
    tokio::time::advance(Duration::from_millis(10_001)).await;
    tokio::task::yield_now().await;
    assert_eq!(
        groups.group_state("g").map(|(state, generation)| (state.name(), generation)),
        Some(("PreparingRebalance", b.generation_id))
    );
    // Until a's session (10 s since the last rebalance) expires.
    groups.expire_sessions();
    assert_eq!(groups.group_state("g"), None, "a's session expired and the emptied group was forgotten");
}

fn transactional_batch(pid: i64, epoch: i16) -> Vec<u8> {
    BatchBuilder::new().producer(pid, epoch, 0).transactional(true).record(NewRecord::new(None, Some(b"v"), 1)).build()
}

fn set_max_message_bytes(log: &Log, topic: &str, value: Option<&str>) {
    let change = [("max.message.bytes".to_owned(), value.map(str::to_owned))].into_iter().collect();
    log.alter_topic_config(topic, &change).unwrap();
}

/// AddPartitionsToTxn over `partitions_max` adds nothing: the transaction still holds only
/// what it held, and ends normally.
#[tokio::test]
async fn add_partitions_over_the_limit_adds_nothing() {
    let TxnFixture { _dir, log, txns, .. } =
        TxnFixture::open(TxnConfig { partitions_max: 2, ..TxnConfig::default() }).await;
    let (pid, epoch) = txns.init_producer_id(Some("tx"), 60_000, None).await.unwrap();
    txns.add_partitions("tx", pid, epoch, &[("out".into(), 0)]).await.unwrap();
    let refused = txns.add_partitions("tx", pid, epoch, &[("x".into(), 1), ("x".into(), 2)]).await;
    assert_eq!(refused, Err(TxnError::TooManyPartitions { count: 3, max: 2 }));
    let held = txns.lock_ongoing("tx", pid, epoch).await.unwrap();
    assert!(held.includes("out", 0) && !held.includes("x", 1) && !held.includes("x", 2), "nothing was added");
    drop(held);
    txns.add_partitions("tx", pid, epoch, &[("x".into(), 1)]).await.unwrap();
    log.partition("out", 0).unwrap().append(transactional_batch(pid, epoch)).unwrap();
    txns.end("tx", pid, epoch, true).await.unwrap();
    assert_eq!(log.partition("out", 0).unwrap().last_stable_offset(), 2);
}

/// When Prepare* cannot be stored (here: the internal topic refuses the record), the
/// transaction stays Ongoing — never Prepare* in memory only, which nothing would complete
/// and which would hold the partition's last stable offset until a restart.
#[tokio::test]
async fn a_transaction_state_write_that_fails_leaves_the_transaction_as_it_was() {
    let TxnFixture { _dir, log, txns, .. } = TxnFixture::open(TxnConfig::default()).await;
    let (pid, epoch) = txns.init_producer_id(Some("tx"), 60_000, None).await.unwrap();
    txns.add_partitions("tx", pid, epoch, &[("out".into(), 0)]).await.unwrap();
    let out = log.partition("out", 0).unwrap();
    out.append(transactional_batch(pid, epoch)).unwrap();

    set_max_message_bytes(&log, kappa_coordinator::TRANSACTION_STATE_TOPIC, Some("64"));
    assert!(matches!(txns.end("tx", pid, epoch, true).await, Err(TxnError::Storage(_))));
    assert!(matches!(txns.add_partitions("tx", pid, epoch, &[("y".into(), 0)]).await, Err(TxnError::Storage(_))));
    assert!(matches!(txns.init_producer_id(Some("tx"), 60_000, Some((pid, epoch))).await, Err(TxnError::Storage(_))));
    assert_eq!(txns.describe().await, vec![("tx".to_owned(), pid, epoch, "Ongoing")]);
    assert!(!txns.lock_ongoing("tx", pid, epoch).await.unwrap().includes("y", 0), "the unstored add is undone");

    set_max_message_bytes(&log, kappa_coordinator::TRANSACTION_STATE_TOPIC, Some("4194304"));
    txns.end("tx", pid, epoch, true).await.unwrap();
    assert_eq!(out.last_stable_offset(), 2, "data and commit marker are stable");
}

/// A transaction whose markers could not be written stays prepared, and the expiry pass
/// (every second in the broker) completes it once they can be: Kafka's coordinator retries
/// markers too.
#[tokio::test]
async fn the_expiry_pass_completes_a_prepared_transaction_whose_markers_failed() {
    let TxnFixture { _dir, log, txns, .. } = TxnFixture::open(TxnConfig::default()).await;
    let (pid, epoch) = txns.init_producer_id(Some("tx"), 60_000, None).await.unwrap();
    txns.add_partitions("tx", pid, epoch, &[("out".into(), 0)]).await.unwrap();
    let out = log.partition("out", 0).unwrap();
    out.append(transactional_batch(pid, epoch)).unwrap();

    set_max_message_bytes(&log, "out", Some("10")); // the marker is refused
    assert!(matches!(txns.end("tx", pid, epoch, true).await, Err(TxnError::Storage(_))));
    assert_eq!(txns.describe().await, vec![("tx".to_owned(), pid, epoch, "PrepareCommit")]);
    assert_eq!(txns.end("tx", pid, epoch, true).await, Err(TxnError::ConcurrentTransactions));
    assert_eq!(txns.abort_expired().await, 0);
    // A new instance fences the old one: the commit is finished under the new epoch.
    assert!(matches!(txns.init_producer_id(Some("tx"), 60_000, None).await, Err(TxnError::Storage(_))));
    assert_eq!(txns.describe().await, vec![("tx".to_owned(), pid, epoch + 1, "PrepareCommit")]);
    assert_eq!(out.last_stable_offset(), 0, "still open while the marker is refused");

    set_max_message_bytes(&log, "out", None);
    assert_eq!(txns.abort_expired().await, 0, "completed, not aborted");
    assert_eq!(txns.describe().await, vec![("tx".to_owned(), pid, epoch + 1, "CompleteCommit")]);
    assert_eq!(out.last_stable_offset(), 2, "data and commit marker are stable");
    assert!(out.read(0, 1 << 20, Isolation::ReadCommitted).unwrap().aborted.is_empty(), "committed");
    txns.add_partitions("tx", pid, epoch + 1, &[("out".into(), 0)]).await.unwrap();
    txns.end("tx", pid, epoch + 1, false).await.unwrap();
}

/// The largest transaction allowed — `partitions_max` partitions of 249-byte topic names,
/// about 2.6 MB stored — fits `__transaction_state`, also one an older version created
/// with the 1 MiB default; and a larger `partitions_max` is lowered to what fits.
#[tokio::test]
async fn the_largest_transaction_allowed_can_be_stored_and_ended() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let log = open_log(dir.path(), &clock);
    log.create_topic(kappa_coordinator::TRANSACTION_STATE_TOPIC, 1, &Default::default()).unwrap();
    let offsets = Arc::new(OffsetStore::open(&log).unwrap());
    let txns = TxnCoordinator::open(log.clone(), offsets.clone(), TxnConfig::default()).await.unwrap();
    let topic = "t".repeat(249);
    let partitions: Vec<(String, i32)> = (0..10_000).map(|p| (topic.clone(), p)).collect();
    let (pid, epoch) = txns.init_producer_id(Some("big"), 60_000, None).await.unwrap();
    txns.add_partitions("big", pid, epoch, &partitions).await.unwrap();
    txns.end("big", pid, epoch, false).await.unwrap();
    drop(txns);

    let config = TxnConfig { partitions_max: usize::MAX, ..TxnConfig::default() };
    let txns = TxnCoordinator::open(log.clone(), offsets, config).await.unwrap();
    assert_eq!(txns.describe().await, vec![("big".to_owned(), pid, epoch, "CompleteAbort")]);
    let limit = kappa_coordinator::TXN_PARTITIONS_MAX_LIMIT;
    let too_many: Vec<(String, i32)> = (0..=limit as i32).map(|p| (topic.clone(), p)).collect();
    let refused = txns.add_partitions("big", pid, epoch, &too_many).await;
    assert_eq!(refused, Err(TxnError::TooManyPartitions { count: limit + 1, max: limit }));
    txns.add_partitions("big", pid, epoch, &too_many[..limit]).await.unwrap();
    txns.end("big", pid, epoch, false).await.unwrap();
}

fn pending_join(group: &str) -> JoinRequest {
    JoinRequest { require_known_member_id: true, ..join_request(group, "") }
}

/// Member ids handed out with MEMBER_ID_REQUIRED and not used yet are bounded per group by
/// `group_members_max` (GROUP_MAX_SIZE_REACHED past it); using one makes room.
#[tokio::test]
async fn member_ids_handed_out_are_bounded_per_group() {
    let groups = GroupCoordinator::new(GroupConfig {
        initial_rebalance_delay_ms: 0,
        group_members_max: 3,
        ..GroupConfig::default()
    });
    let mut handed_out = Vec::new();
    for _ in 0..3 {
        match groups.join(pending_join("g")).await {
            Err(GroupError::MemberIdRequired(id)) => handed_out.push(id),
            other => panic!("expected MemberIdRequired, got {other:?}"),
        }
    }
    assert_eq!(groups.join(pending_join("g")).await, Err(GroupError::GroupMaxSizeReached { members_max: 3 }));
    assert!(matches!(groups.join(pending_join("other")).await, Err(GroupError::MemberIdRequired(_))), "per group");
    groups.join(join_request("g", &handed_out[0])).await.unwrap();
    assert!(matches!(groups.join(pending_join("g")).await, Err(GroupError::MemberIdRequired(_))), "room again");
}

/// A member offering more than `protocols_per_member_max` protocols or more than
/// `member_metadata_bytes_max` bytes of them is refused, and so is a leader's assignment over
/// that size; at the limits they are accepted.
#[tokio::test]
async fn member_protocols_metadata_and_assignments_are_bounded() {
    let config = GroupConfig {
        initial_rebalance_delay_ms: 0,
        member_metadata_bytes_max: 1000,
        protocols_per_member_max: 4,
        ..GroupConfig::default()
    };
    let groups = GroupCoordinator::new(config);
    let with_protocols = |protocols: Vec<(String, Vec<u8>)>| JoinRequest { protocols, ..join_request("g", "") };
    let many = (0..5).map(|i| (format!("p{i}"), Vec::new())).collect();
    assert_eq!(groups.join(with_protocols(many)).await, Err(GroupError::InconsistentGroupProtocol));
    let big = vec![("range".to_owned(), vec![0; 996])];
    assert_eq!(groups.join(with_protocols(big)).await, Err(GroupError::InconsistentGroupProtocol));
    let at_limit =
        vec![("range".to_owned(), vec![0; 992]), ("a".to_owned(), vec![]), ("b".into(), vec![]), ("c".into(), vec![])];
    assert_eq!(at_limit.iter().map(|(n, m)| n.len() + m.len()).sum::<usize>(), 1000);
    let joined = groups.join(with_protocols(at_limit)).await.unwrap();
    let sync = |assignment: Vec<u8>| SyncRequest {
        group_id: "g".to_owned(),
        generation_id: joined.generation_id,
        member_id: joined.member_id.clone(),
        group_instance_id: None,
        assignments: vec![(joined.member_id.clone(), assignment)],
    };
    assert_eq!(groups.sync(sync(vec![1; 1001])).await, Err(GroupError::InconsistentGroupProtocol));
    assert_eq!(groups.sync(sync(vec![1; 1000])).await, Ok(vec![1; 1000]));
}

/// Each rebalance used to spawn a timer sleeping the longest rebalance timeout (up to
/// i32::MAX ms, 24 days) that stayed alive after the rebalance ended: a churning group
/// piled them up. Now a group has one timer at most, stopped when its join phase ends.
#[tokio::test]
async fn a_churning_group_keeps_no_rebalance_timers_alive() {
    let groups = coordinator();
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    for _ in 0..100 {
        let request = JoinRequest { rebalance_timeout_ms: i32::MAX, ..join_request("g", "") };
        let joined = groups.join(request).await.unwrap();
        groups.leave("g", &joined.member_id, None).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metrics.num_alive_tasks() > baseline {
        assert!(
            std::time::Instant::now() < deadline,
            "{} timer tasks still alive",
            metrics.num_alive_tasks() - baseline
        );
        tokio::task::yield_now().await;
    }
}

/// Kafka's protocol vote: every member votes for its most preferred protocol all support;
/// a tie goes to the first member's preference.
#[tokio::test]
async fn the_protocol_most_members_prefer_among_the_common_ones_wins() {
    let protocols = |names: &[&str]| names.iter().map(|n| (n.to_string(), n.as_bytes().to_vec())).collect();
    for (lists, expected) in [
        (vec![vec!["a", "b", "c"], vec!["b", "a"], vec!["b", "c", "a"]], "b"),
        (vec![vec!["a", "b"], vec!["b", "a"]], "a"),
        (vec![vec!["x", "a", "x"], vec!["a", "x"]], "x"),
    ] {
        let groups = coordinator_with_initial_delay();
        let joins =
            lists.iter().map(|names| groups.join(JoinRequest { protocols: protocols(names), ..join_request("g", "") }));
        for joined in futures_join_all(joins).await {
            let joined = joined.unwrap();
            assert_eq!(joined.protocol_name, expected, "{lists:?}");
            if joined.leader == joined.member_id {
                assert!(joined.members.iter().all(|(_, _, metadata)| metadata == expected.as_bytes()));
            }
        }
    }
}

/// Runs the futures concurrently on this task, in order.
async fn futures_join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    let mut handles: Vec<Option<_>> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (handle, output) in handles.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = handle {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => {
                        *output = Some(value);
                        *handle = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

/// Offset records hold a group id of at most 65,535 bytes: a longer one is refused with a
/// clear error, never stored cut (it would come back under another group's name after a
/// restart); the group coordinator's checks for offset commits and DeleteGroups apply its
/// tighter `id_bytes_max`.
#[tokio::test]
async fn a_group_id_too_long_to_store_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000);
    let long = "g".repeat(70_000);
    {
        let log = open_log(dir.path(), &clock);
        let store = OffsetStore::open(&log).unwrap();
        let refused = store.commit(&long, vec![(("t".into(), 0), offset(5))]).await;
        let Err(GroupError::InvalidGroupId(message)) = refused else { panic!("{refused:?}") };
        assert!(message.contains("70000 bytes") && message.contains("65535"), "{message}");
        let refused = store.commit_transactional(7, 0, &long, vec![(("t".into(), 0), offset(5))]).await;
        assert!(matches!(refused, Err(GroupError::InvalidGroupId(_))), "{refused:?}");
        let refused = store.delete(&long, Some(vec![("t".into(), 0)])).await;
        assert!(matches!(refused, Err(GroupError::InvalidGroupId(_))), "{refused:?}");
        assert_eq!(store.partition().high_watermark(), 0, "nothing was written");

        let groups = coordinator();
        let over_id_bytes_max = "g".repeat(1_025);
        for id in [&long, &over_id_bytes_max] {
            assert!(matches!(groups.validate_member(id, -1, "", None), Err(GroupError::InvalidGroupId(_))));
            assert!(matches!(groups.validate_txn_member(id, -1, "", None), Err(GroupError::InvalidGroupId(_))));
            assert!(matches!(groups.delete(id), Err(GroupError::InvalidGroupId(_))));
        }
    }
    let log = open_log(dir.path(), &clock);
    let store = OffsetStore::open(&log).unwrap();
    assert!(store.groups().is_empty(), "no group came back under a cut name");
}

/// DescribeGroups reports member metadata and assignments only for a Stable group, as
/// Kafka's GroupMetadata.summary does: during a rebalance they are not settled.
#[tokio::test]
async fn describe_reports_metadata_and_assignments_only_when_stable() {
    let groups = coordinator();
    let first = groups.join(join_request("g", "")).await.unwrap();
    let sync = |member: &str, generation, assignments| SyncRequest {
        group_id: "g".to_owned(),
        generation_id: generation,
        member_id: member.to_owned(),
        group_instance_id: None,
        assignments,
    };
    let assigned =
        groups.sync(sync(&first.member_id, first.generation_id, vec![(first.member_id.clone(), b"A".to_vec())]));
    assert_eq!(assigned.await.unwrap(), b"A".to_vec());
    let described = groups.describe("g");
    assert_eq!((described.state, described.protocol.as_str()), ("Stable", "range"));
    assert_eq!((&described.members[0].metadata[..], &described.members[0].assignment[..]), (&b"meta"[..], &b"A"[..]));

    let second = tokio::spawn({
        let groups = groups.clone();
        async move { groups.join(join_request("g", "")).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while groups.describe("g").members.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the second member never joined");
        tokio::task::yield_now().await;
    }
    let unsettled = |state: &str| {
        let described = groups.describe("g");
        assert_eq!((described.state, described.protocol.as_str()), (state, ""));
        assert!(described.members.iter().all(|m| m.metadata.is_empty() && m.assignment.is_empty()), "{described:?}");
    };
    unsettled("PreparingRebalance");
    let rejoined = groups.join(join_request("g", &first.member_id)).await.unwrap();
    let second = second.await.unwrap().unwrap();
    unsettled("CompletingRebalance");
    let assignments = vec![(first.member_id.clone(), b"A2".to_vec()), (second.member_id.clone(), b"B".to_vec())];
    let (a, b) = tokio::join!(
        groups.sync(sync(&rejoined.leader, rejoined.generation_id, assignments)),
        groups.sync(sync(&second.member_id, second.generation_id, vec![]))
    );
    a.unwrap();
    b.unwrap();
    let described = groups.describe("g");
    assert_eq!(described.state, "Stable");
    let assignments: Vec<&[u8]> = described.members.iter().map(|m| &m.assignment[..]).collect();
    assert_eq!(assignments, [&b"A2"[..], &b"B"[..]]);
    assert!(described.members.iter().all(|m| m.metadata == b"meta"));
}
