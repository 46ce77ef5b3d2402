//! Consumer-group membership: Kafka's classic rebalance protocol (JoinGroup, SyncGroup,
//! Heartbeat, LeaveGroup), with generations starting at 1, rebalance and session timeouts
//! and static membership (`group.instance.id`).
//!
//! States: Empty → PreparingRebalance (members (re)join) → CompletingRebalance (the leader
//! computes assignments) → Stable. A join, a leave or an expired session sends a Stable
//! group back to PreparingRebalance. The coordinator picks the protocol every member
//! supports and passes member metadata and assignments through as opaque bytes, so any
//! assignor the members agree on (range, roundrobin, cooperative-sticky) works.
//!
//! Invariant: this module knows membership, not the wire: no error codes, no request
//! versions (the broker maps [`GroupError`] to Kafka codes).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::GroupError;
use crate::offsets::OFFSET_KEY_NAME_BYTES_MAX;

/// Limits and timing of the group coordinator.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Kafka: group.min.session.timeout.ms.
    pub session_timeout_ms_min: i32,
    /// Kafka: group.max.session.timeout.ms.
    pub session_timeout_ms_max: i32,
    /// Kafka: group.initial.rebalance.delay.ms — how long the first rebalance of an empty
    /// group waits for more members.
    pub initial_rebalance_delay_ms: u64,
    /// Kafka: group.max.size.
    pub group_members_max: usize,
    /// Live groups (with members, or member ids handed out) one coordinator keeps; Empty
    /// ones are forgotten (their committed offsets stay in the offset store).
    pub groups_max: usize,
    /// Longest group id, member id or instance id accepted, in bytes (JoinGroup, offset
    /// commits, DeleteGroups); at most [`OFFSET_KEY_NAME_BYTES_MAX`], what an offset record
    /// holds.
    pub id_bytes_max: usize,
    /// Most bytes of one member's protocols (names plus metadata) in a JoinGroup, and of one
    /// member's assignment in SyncGroup. Kafka bounds them only through the group's record
    /// in `__consumer_offsets` (1 MiB); kappa keeps them in memory, so bounds each.
    pub member_metadata_bytes_max: usize,
    /// Most protocols (assignors) one member may offer. Kafka has no limit; clients offer
    /// one to three, so this is generous while bounding the protocol vote's work.
    pub protocols_per_member_max: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            session_timeout_ms_min: 1_000,
            session_timeout_ms_max: 1_800_000,
            initial_rebalance_delay_ms: 300,
            group_members_max: 1_000,
            groups_max: 100_000,
            id_bytes_max: 1_024,
            member_metadata_bytes_max: 1024 * 1024,
            protocols_per_member_max: 64,
        }
    }
}

/// A JoinGroup request, decoded.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub group_id: String,
    /// Empty on a member's first join.
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    /// (protocol name, member metadata), in the member's order of preference.
    pub protocols: Vec<(String, Vec<u8>)>,
    /// JoinGroup v4+: a first join gets a member id to come back with (MEMBER_ID_REQUIRED).
    pub require_known_member_id: bool,
}

/// A completed join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOutcome {
    pub generation_id: i32,
    pub protocol_type: String,
    pub protocol_name: String,
    pub leader: String,
    pub member_id: String,
    /// For the leader only: every member's (id, instance id, metadata for the chosen protocol).
    pub members: Vec<(String, Option<String>, Vec<u8>)>,
    /// True when the coordinator answered from the current generation without a rebalance.
    pub skip_assignment: bool,
}

/// A SyncGroup request, decoded.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub group_id: String,
    pub generation_id: i32,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    /// From the leader: (member id, assignment).
    pub assignments: Vec<(String, Vec<u8>)>,
}

/// What DescribeGroups reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    pub state: &'static str,
    pub protocol_type: String,
    pub protocol: String,
    /// (member id, instance id, client id, client host, metadata, assignment).
    pub members: Vec<MemberDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Vec<u8>,
    pub assignment: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    /// Kafka's names for DescribeGroups / ListGroups.
    pub fn name(self) -> &'static str {
        match self {
            Self::Empty => "Empty",
            Self::PreparingRebalance => "PreparingRebalance",
            Self::CompletingRebalance => "CompletingRebalance",
            Self::Stable => "Stable",
        }
    }
}

type JoinWaiter = oneshot::Sender<Result<JoinOutcome, GroupError>>;
type SyncWaiter = oneshot::Sender<Result<Vec<u8>, GroupError>>;

struct Member {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Vec<u8>)>,
    assignment: Vec<u8>,
    last_heartbeat: Instant,
    join_waiter: Option<JoinWaiter>,
    sync_waiter: Option<SyncWaiter>,
}

struct Group {
    id: String,
    state: GroupState,
    generation: i32,
    protocol_type: String,
    protocol: String,
    leader: Option<String>,
    /// In join order (the order Kafka reports members in).
    members: BTreeMap<u64, Member>,
    next_member_seq: u64,
    /// Member ids handed out with MEMBER_ID_REQUIRED that have not joined yet, with the
    /// moment each expires (the session timeout of the join that asked, as in Kafka).
    pending: HashMap<String, Instant>,
    /// Tells this group from an earlier one of the same id that was forgotten, whose
    /// timers may still be running.
    incarnation: u64,
    /// Bumped at every rebalance so stale timers do nothing.
    rebalance_epoch: u64,
    /// The one pending rebalance timer: replaced (the old one aborted) by the next, so a
    /// churning group with long rebalance timeouts never accumulates sleeping tasks.
    timer: Option<tokio::task::AbortHandle>,
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop_timer();
    }
}

impl Group {
    fn new(id: &str, incarnation: u64) -> Self {
        Self {
            id: id.to_owned(),
            state: GroupState::Empty,
            generation: 0,
            protocol_type: String::new(),
            protocol: String::new(),
            leader: None,
            members: BTreeMap::new(),
            next_member_seq: 0,
            pending: HashMap::new(),
            incarnation,
            rebalance_epoch: 0,
            timer: None,
        }
    }

    fn stop_timer(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
    }

    fn seq_of(&self, member_id: &str) -> Option<u64> {
        self.members.iter().find(|(_, m)| m.id == member_id).map(|(&seq, _)| seq)
    }

    fn seq_of_instance(&self, instance_id: &str) -> Option<u64> {
        self.members.iter().find(|(_, m)| m.instance_id.as_deref() == Some(instance_id)).map(|(&seq, _)| seq)
    }

    /// The member a request names, checking static-membership fencing.
    fn member_seq(&self, member_id: &str, instance_id: Option<&str>) -> Result<u64, GroupError> {
        if let Some(instance) = instance_id
            && let Some(seq) = self.seq_of_instance(instance)
        {
            return if self.members[&seq].id == member_id { Ok(seq) } else { Err(GroupError::FencedInstanceId) };
        }
        self.seq_of(member_id).ok_or(GroupError::UnknownMemberId)
    }

    /// Protocols every member except `exclude` (plus `candidate`, if given) supports, in
    /// the order the first of them prefers. O(protocols × members): it runs under the
    /// groups lock.
    fn common_protocols(&self, exclude: Option<u64>, candidate: Option<&[(String, Vec<u8>)]>) -> Vec<String> {
        let mut lists = self
            .members
            .iter()
            .filter(|(seq, _)| Some(**seq) != exclude)
            .map(|(_, m)| m.protocols.as_slice())
            .chain(candidate);
        let Some(first) = lists.next() else { return Vec::new() };
        let mut common: Vec<&str> = Vec::new();
        let mut seen = HashSet::new();
        for (name, _) in first {
            if seen.insert(name.as_str()) {
                common.push(name);
            }
        }
        for list in lists {
            if common.is_empty() {
                break;
            }
            let names: HashSet<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
            common.retain(|name| names.contains(name));
        }
        common.into_iter().map(str::to_owned).collect()
    }

    /// Kafka's vote: each member votes for its most preferred common protocol; a tie goes
    /// to the protocol the first member prefers.
    fn select_protocol(&self) -> String {
        let common = self.common_protocols(None, None);
        let rank: HashMap<&str, usize> = common.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let mut votes = vec![0usize; common.len()];
        for member in self.members.values() {
            if let Some(&i) = member.protocols.iter().find_map(|(n, _)| rank.get(n.as_str())) {
                votes[i] += 1;
            }
        }
        (0..common.len())
            .max_by_key(|&i| (votes[i], std::cmp::Reverse(i)))
            .map(|i| common[i].clone())
            .unwrap_or_default()
    }

    fn metadata_for(&self, member: &Member) -> Vec<u8> {
        member.protocols.iter().find(|(n, _)| *n == self.protocol).map(|(_, m)| m.clone()).unwrap_or_default()
    }

    fn fail_sync_waiters(&mut self, error: GroupError) {
        for member in self.members.values_mut() {
            if let Some(waiter) = member.sync_waiter.take() {
                let _ = waiter.send(Err(error.clone()));
            }
        }
    }

    fn all_joined(&self) -> bool {
        self.members.values().all(|m| m.join_waiter.is_some())
    }

    /// Nothing left to remember but the id (Kafka removes such groups too): no members,
    /// no member ids handed out.
    fn is_idle(&self) -> bool {
        self.state == GroupState::Empty && self.members.is_empty() && self.pending.is_empty()
    }
}

/// The consumer-group coordinator (membership only; offsets live in [`crate::offsets`]).
#[derive(Clone)]
pub struct GroupCoordinator {
    inner: Arc<Inner>,
}

struct Inner {
    config: GroupConfig,
    groups: Mutex<HashMap<String, Group>>,
    groups_created: AtomicU64,
}

impl GroupCoordinator {
    pub fn new(config: GroupConfig) -> Self {
        Self {
            inner: Arc::new(Inner { config, groups: Mutex::new(HashMap::new()), groups_created: AtomicU64::new(0) }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Group>> {
        self.inner.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses a group id longer than this coordinator takes (`id_bytes_max`): for callers
    /// that commit offsets outside the group protocol (the admin API).
    pub fn check_group_id(&self, id: &str) -> Result<(), GroupError> {
        self.check_id(id)
    }

    fn check_id(&self, id: &str) -> Result<(), GroupError> {
        if id.len() > self.inner.config.id_bytes_max.min(OFFSET_KEY_NAME_BYTES_MAX) {
            return Err(GroupError::InvalidGroupId(format!(
                "an id is {} bytes; group, member and instance ids are limited to {} bytes",
                id.len(),
                self.inner.config.id_bytes_max.min(OFFSET_KEY_NAME_BYTES_MAX)
            )));
        }
        Ok(())
    }

    /// A member's protocols within `protocols_per_member_max` and `member_metadata_bytes_max`
    /// (refused as inconsistent: the error Kafka clients know for a join with unusable
    /// protocols).
    fn check_protocols(&self, request: &JoinRequest) -> Result<(), GroupError> {
        let config = &self.inner.config;
        let bytes: usize = request.protocols.iter().map(|(name, metadata)| name.len() + metadata.len()).sum();
        if request.protocols.len() > config.protocols_per_member_max || bytes > config.member_metadata_bytes_max {
            tracing::warn!(
                group = %request.group_id,
                client_id = %request.client_id,
                protocols = request.protocols.len(),
                protocols_max = config.protocols_per_member_max,
                bytes,
                bytes_max = config.member_metadata_bytes_max,
                "join refused: too many protocols or too much member metadata"
            );
            return Err(GroupError::InconsistentGroupProtocol);
        }
        Ok(())
    }

    /// JoinGroup: resolves when the rebalance this join takes part in completes.
    pub async fn join(&self, request: JoinRequest) -> Result<JoinOutcome, GroupError> {
        let receiver = self.register_join(request)?;
        match receiver {
            Joined::Now(outcome) => Ok(outcome),
            Joined::Wait(receiver) => receiver.await.unwrap_or(Err(GroupError::RebalanceInProgress)),
        }
    }

    fn register_join(&self, request: JoinRequest) -> Result<Joined, GroupError> {
        let config = &self.inner.config;
        if request.group_id.is_empty() {
            return Err(GroupError::InvalidGroupId("the group id is empty".to_owned()));
        }
        self.check_id(&request.group_id)?;
        self.check_id(&request.member_id)?;
        if let Some(instance) = &request.group_instance_id {
            self.check_id(instance)?;
        }
        if !(config.session_timeout_ms_min..=config.session_timeout_ms_max).contains(&request.session_timeout_ms) {
            return Err(GroupError::InvalidSessionTimeout {
                min: config.session_timeout_ms_min,
                max: config.session_timeout_ms_max,
            });
        }
        if request.protocols.is_empty() || request.protocol_type.is_empty() {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        self.check_protocols(&request)?;
        let mut groups = self.lock();
        if !groups.contains_key(&request.group_id) && groups.len() >= config.groups_max {
            // Idle groups left since the last reaper pass do not count.
            groups.retain(|_, g| !g.is_idle());
            if groups.len() >= config.groups_max {
                return Err(GroupError::CoordinatorFull { groups_max: config.groups_max });
            }
        }
        let group = groups.entry(request.group_id.clone()).or_insert_with(|| {
            Group::new(&request.group_id, self.inner.groups_created.fetch_add(1, Ordering::Relaxed))
        });
        if !group.members.is_empty() && group.protocol_type != request.protocol_type {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        let existing = match &request.group_instance_id {
            Some(instance) => group.seq_of_instance(instance),
            None if request.member_id.is_empty() => None,
            None => group.seq_of(&request.member_id),
        };
        if group.common_protocols(existing, Some(&request.protocols)).is_empty() {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        let now = Instant::now();
        let (sender, receiver) = oneshot::channel();
        match existing {
            Some(seq) => {
                // A static member rejoining with no member id (a restarted instance) takes
                // over under a new id.
                let replacing = request.group_instance_id.is_some() && request.member_id.is_empty();
                let leader_before = group.leader.clone().unwrap_or_default();
                let member = group.members.get_mut(&seq).expect("member");
                if !replacing && request.group_instance_id.is_some() && request.member_id != member.id {
                    return Err(GroupError::FencedInstanceId);
                }
                let was_leader = leader_before == member.id;
                if replacing {
                    member.id = new_member_id(&request);
                    // Whoever still waits under the old id is the instance just replaced.
                    if let Some(old) = member.join_waiter.take() {
                        let _ = old.send(Err(GroupError::FencedInstanceId));
                    }
                    if let Some(old) = member.sync_waiter.take() {
                        let _ = old.send(Err(GroupError::FencedInstanceId));
                    }
                }
                let unchanged = member.protocols == request.protocols;
                member.protocols = request.protocols.clone();
                member.session_timeout = ms(request.session_timeout_ms);
                member.rebalance_timeout = ms(request.rebalance_timeout_ms.max(request.session_timeout_ms));
                member.last_heartbeat = now;
                let member_id = member.id.clone();
                if replacing && was_leader {
                    group.leader = Some(member_id.clone());
                }
                let keep_generation = group.state == GroupState::Stable
                    && if replacing {
                        // Kafka rebalances a restarted static member only if the group's
                        // protocol would change: its metadata (librdkafka puts the owned
                        // partitions in it) differs at every restart.
                        group.select_protocol() == group.protocol
                    } else {
                        // The leader's rejoin always rebalances, so it can pick up changes.
                        unchanged && !was_leader
                    };
                if keep_generation {
                    let outcome = JoinOutcome {
                        generation_id: group.generation,
                        protocol_type: group.protocol_type.clone(),
                        protocol_name: group.protocol.clone(),
                        // A replaced leader is told the old id, so it does not compute
                        // assignments a Stable group would not pass on (Kafka does the same).
                        leader: leader_before,
                        member_id,
                        members: Vec::new(),
                        skip_assignment: false,
                    };
                    return Ok(Joined::Now(outcome));
                }
                let member = group.members.get_mut(&seq).expect("member");
                if let Some(old) = member.join_waiter.replace(sender) {
                    let _ = old.send(Err(GroupError::RebalanceInProgress));
                }
            }
            None => {
                if !request.member_id.is_empty()
                    && group.pending.remove(&request.member_id).is_none_or(|expiry| expiry < now)
                {
                    return Err(GroupError::UnknownMemberId);
                }
                let member_id =
                    if request.member_id.is_empty() { new_member_id(&request) } else { request.member_id.clone() };
                if request.member_id.is_empty()
                    && request.require_known_member_id
                    && request.group_instance_id.is_none()
                {
                    // Kafka checks the group's room before handing out a member id too; kappa
                    // also bounds the ids handed out and not used yet (they live a session
                    // timeout, up to 30 min, and the reaper scans them under the lock).
                    if group.pending.len() >= config.group_members_max {
                        group.pending.retain(|_, expiry| *expiry >= now);
                    }
                    if group.members.len() >= config.group_members_max
                        || group.pending.len() >= config.group_members_max
                    {
                        return Err(GroupError::GroupMaxSizeReached { members_max: config.group_members_max });
                    }
                    group.pending.insert(member_id.clone(), now + ms(request.session_timeout_ms));
                    return Err(GroupError::MemberIdRequired(member_id));
                }
                if group.members.len() >= config.group_members_max {
                    return Err(GroupError::GroupMaxSizeReached { members_max: config.group_members_max });
                }
                let seq = group.next_member_seq;
                group.next_member_seq += 1;
                group.members.insert(
                    seq,
                    Member {
                        id: member_id,
                        instance_id: request.group_instance_id.clone(),
                        client_id: request.client_id.clone(),
                        client_host: request.client_host.clone(),
                        session_timeout: ms(request.session_timeout_ms),
                        rebalance_timeout: ms(request.rebalance_timeout_ms.max(request.session_timeout_ms)),
                        protocols: request.protocols.clone(),
                        assignment: Vec::new(),
                        last_heartbeat: now,
                        join_waiter: Some(sender),
                        sync_waiter: None,
                    },
                );
            }
        }
        group.protocol_type = request.protocol_type.clone();
        if group.state != GroupState::PreparingRebalance {
            self.prepare_rebalance(group);
        }
        if group.all_joined() && !self.delaying_initial_rebalance(group) {
            complete_join(group);
        }
        Ok(Joined::Wait(receiver))
    }

    /// The first rebalance of an empty group waits `initial_rebalance_delay_ms` for more
    /// members, so a group of consumers starting together rebalances once.
    fn delaying_initial_rebalance(&self, group: &Group) -> bool {
        group.generation == 0 && self.inner.config.initial_rebalance_delay_ms > 0
    }

    fn prepare_rebalance(&self, group: &mut Group) {
        group.state = GroupState::PreparingRebalance;
        group.fail_sync_waiters(GroupError::RebalanceInProgress);
        group.rebalance_epoch += 1;
        let timeout = if self.delaying_initial_rebalance(group) {
            Duration::from_millis(self.inner.config.initial_rebalance_delay_ms)
        } else {
            rebalance_timeout(group)
        };
        self.complete_join_after(group, timeout);
    }

    /// Ends the join phase of the current rebalance after `timeout`, unless it ended already.
    /// Replaces the group's previous timer.
    fn complete_join_after(&self, group: &mut Group, timeout: Duration) {
        let (incarnation, epoch) = (group.incarnation, group.rebalance_epoch);
        let coordinator = self.clone();
        let group_id = group.id.clone();
        group.stop_timer();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let mut groups = coordinator.lock();
            if let Some(group) = groups.get_mut(&group_id)
                && (group.incarnation, group.rebalance_epoch) == (incarnation, epoch)
                && group.state == GroupState::PreparingRebalance
                && !complete_join(group)
            {
                // Only static members that did not rejoin are left: wait for them, or for
                // their sessions to expire (Kafka too).
                let timeout = rebalance_timeout(group);
                coordinator.complete_join_after(group, timeout);
            }
        });
        group.timer = Some(timer.abort_handle());
    }

    /// SyncGroup: the leader's call carries every assignment; each member's call resolves
    /// with its own assignment once the leader's has arrived.
    pub async fn sync(&self, request: SyncRequest) -> Result<Vec<u8>, GroupError> {
        let receiver = {
            let mut groups = self.lock();
            let group = groups.get_mut(&request.group_id).ok_or(GroupError::UnknownMemberId)?;
            let seq = group.member_seq(&request.member_id, request.group_instance_id.as_deref())?;
            if request.generation_id != group.generation {
                return Err(GroupError::IllegalGeneration);
            }
            group.members.get_mut(&seq).expect("member").last_heartbeat = Instant::now();
            match group.state {
                GroupState::PreparingRebalance => return Err(GroupError::RebalanceInProgress),
                GroupState::Stable => return Ok(group.members[&seq].assignment.clone()),
                GroupState::Empty => return Err(GroupError::UnknownMemberId),
                GroupState::CompletingRebalance => {}
            }
            let is_leader = group.leader.as_deref() == Some(request.member_id.as_str());
            let assignment_bytes_max = self.inner.config.member_metadata_bytes_max;
            if is_leader
                && let Some((member, assignment)) =
                    request.assignments.iter().find(|(_, a)| a.len() > assignment_bytes_max)
            {
                tracing::warn!(group = %group.id, %member, bytes = assignment.len(), bytes_max = assignment_bytes_max, "sync refused: an assignment is over member_metadata_bytes_max");
                return Err(GroupError::InconsistentGroupProtocol);
            }
            let (sender, receiver) = oneshot::channel();
            group.members.get_mut(&seq).expect("member").sync_waiter = Some(sender);
            if is_leader {
                let assignments: HashMap<String, Vec<u8>> = request.assignments.into_iter().collect();
                for member in group.members.values_mut() {
                    member.assignment = assignments.get(&member.id).cloned().unwrap_or_default();
                    if let Some(waiter) = member.sync_waiter.take() {
                        let _ = waiter.send(Ok(member.assignment.clone()));
                    }
                }
                group.state = GroupState::Stable;
                tracing::info!(group = %group.id, generation = group.generation, members = group.members.len(), protocol = %group.protocol, "group is stable");
            }
            receiver
        };
        receiver.await.unwrap_or(Err(GroupError::RebalanceInProgress))
    }

    /// Heartbeat: keeps the session alive and tells the member when to rejoin.
    pub fn heartbeat(
        &self,
        group_id: &str,
        generation_id: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        let mut groups = self.lock();
        let group = groups.get_mut(group_id).ok_or(GroupError::UnknownMemberId)?;
        let seq = group.member_seq(member_id, instance_id)?;
        // Only a heartbeat of the current generation keeps the session alive (Kafka too).
        if generation_id != group.generation {
            return Err(GroupError::IllegalGeneration);
        }
        group.members.get_mut(&seq).expect("member").last_heartbeat = Instant::now();
        match group.state {
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    /// LeaveGroup for one member (by member id, or by instance id for static members).
    pub fn leave(&self, group_id: &str, member_id: &str, instance_id: Option<&str>) -> Result<(), GroupError> {
        let mut groups = self.lock();
        let group = groups.get_mut(group_id).ok_or(GroupError::UnknownMemberId)?;
        let seq = match instance_id {
            Some(instance) => {
                let seq = group.seq_of_instance(instance).ok_or(GroupError::UnknownMemberId)?;
                if !member_id.is_empty() && group.members[&seq].id != member_id {
                    return Err(GroupError::FencedInstanceId);
                }
                seq
            }
            None => group.seq_of(member_id).ok_or(GroupError::UnknownMemberId)?,
        };
        let member = group.members.remove(&seq).expect("member");
        if let Some(waiter) = member.join_waiter {
            let _ = waiter.send(Err(GroupError::UnknownMemberId));
        }
        tracing::info!(group = %group.id, member = %member.id, "member left the group");
        self.after_removal(group);
        Ok(())
    }

    /// After members left or expired: an empty group goes Empty, otherwise rebalance.
    fn after_removal(&self, group: &mut Group) {
        if group.members.is_empty() {
            group.fail_sync_waiters(GroupError::RebalanceInProgress);
            group.state = GroupState::Empty;
            group.leader = None;
            group.rebalance_epoch += 1;
            group.generation += 1;
            group.stop_timer();
            return;
        }
        if group.state != GroupState::PreparingRebalance {
            self.prepare_rebalance(group);
        }
        if group.all_joined() {
            complete_join(group);
        }
    }

    /// Removes members whose session expired and member ids handed out but never used
    /// (called periodically), then forgets the groups left with neither. Members waiting in
    /// a join are governed by the rebalance timeout instead.
    pub fn expire_sessions(&self) {
        let now = Instant::now();
        let mut groups = self.lock();
        for group in groups.values_mut() {
            group.pending.retain(|_, expiry| *expiry >= now);
            let expired: Vec<u64> = group
                .members
                .iter()
                .filter(|(_, m)| {
                    m.join_waiter.is_none()
                        && m.sync_waiter.is_none()
                        && now.duration_since(m.last_heartbeat) > m.session_timeout
                })
                .map(|(&seq, _)| seq)
                .collect();
            if expired.is_empty() {
                continue;
            }
            for seq in expired {
                let member = group.members.remove(&seq).expect("member");
                tracing::info!(group = %group.id, member = %member.id, "member session expired");
            }
            self.after_removal(group);
        }
        // Without this every group id ever used (console consumers, generated ids) would
        // stay until groups_max refuses new groups.
        groups.retain(|_, g| !g.is_idle());
    }

    /// Runs [`Self::expire_sessions`] every `interval` until the returned handle is aborted.
    pub fn spawn_session_reaper(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let coordinator = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                coordinator.expire_sessions();
            }
        })
    }

    /// The state and current generation of a group, if it exists.
    pub fn group_state(&self, group_id: &str) -> Option<(GroupState, i32)> {
        self.lock().get(group_id).map(|g| (g.state, g.generation))
    }

    /// Whether `member_id` is a member of the group at `generation_id` (for offset commits).
    pub fn validate_member(
        &self,
        group_id: &str,
        generation_id: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        self.check_id(group_id)?;
        let groups = self.lock();
        let Some(group) = groups.get(group_id) else {
            return if generation_id < 0 { Ok(()) } else { Err(GroupError::IllegalGeneration) };
        };
        if generation_id < 0 && member_id.is_empty() {
            // A commit outside any generation (manual assignment): only for a group with no members.
            return if group.members.is_empty() { Ok(()) } else { Err(GroupError::UnknownMemberId) };
        }
        group.member_seq(member_id, instance_id)?;
        if generation_id != group.generation {
            return Err(GroupError::IllegalGeneration);
        }
        if group.state == GroupState::CompletingRebalance {
            return Err(GroupError::RebalanceInProgress);
        }
        Ok(())
    }

    /// Whether a transactional offset commit (TxnOffsetCommit v3+, KIP-447) comes from the
    /// current generation. As in Kafka, a commit naming no member and no generation (v0-2,
    /// or a producer outside any group) is accepted whatever the group's state, and so is
    /// one during CompletingRebalance: the producer's transaction, not the group, orders it.
    pub fn validate_txn_member(
        &self,
        group_id: &str,
        generation_id: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        self.check_id(group_id)?;
        if generation_id < 0 && member_id.is_empty() && instance_id.is_none() {
            return Ok(());
        }
        let groups = self.lock();
        // An unknown group is an Empty one with no members: Kafka creates it and checks alike.
        let Some(group) = groups.get(group_id) else {
            return if generation_id < 0 { Ok(()) } else { Err(GroupError::UnknownMemberId) };
        };
        if generation_id < 0 && group.state == GroupState::Empty {
            return Ok(());
        }
        group.member_seq(member_id, instance_id)?;
        if generation_id != group.generation {
            return Err(GroupError::IllegalGeneration);
        }
        Ok(())
    }

    /// ListGroups: (group id, protocol type, state).
    pub fn list(&self) -> Vec<(String, String, &'static str)> {
        let mut out: Vec<_> =
            self.lock().values().map(|g| (g.id.clone(), g.protocol_type.clone(), g.state.name())).collect();
        out.sort();
        out
    }

    /// DescribeGroups for one group (Dead with no members when unknown, as Kafka answers);
    /// members' metadata and assignments are empty unless the group is Stable.
    pub fn describe(&self, group_id: &str) -> GroupDescription {
        let groups = self.lock();
        let Some(group) = groups.get(group_id) else {
            return GroupDescription {
                group_id: group_id.to_owned(),
                state: "Dead",
                protocol_type: String::new(),
                protocol: String::new(),
                members: Vec::new(),
            };
        };
        // Kafka (GroupMetadata.summary) reports the protocol, member metadata and
        // assignments only for a Stable group: during a rebalance they are not settled.
        let stable = group.state == GroupState::Stable;
        GroupDescription {
            group_id: group.id.clone(),
            state: group.state.name(),
            protocol_type: group.protocol_type.clone(),
            protocol: if stable { group.protocol.clone() } else { String::new() },
            members: group
                .members
                .values()
                .map(|m| MemberDescription {
                    member_id: m.id.clone(),
                    group_instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: if stable { group.metadata_for(m) } else { Vec::new() },
                    assignment: if stable { m.assignment.clone() } else { Vec::new() },
                })
                .collect(),
        }
    }

    /// Forgets an empty group (DeleteGroups); a group with members is refused.
    pub fn delete(&self, group_id: &str) -> Result<(), GroupError> {
        self.check_id(group_id)?;
        let mut groups = self.lock();
        match groups.get(group_id) {
            None => Err(GroupError::GroupIdNotFound),
            Some(group) if !group.members.is_empty() => Err(GroupError::NonEmptyGroup),
            Some(_) => {
                groups.remove(group_id);
                Ok(())
            }
        }
    }

    /// Whether the group has active members (OffsetDelete refuses subscribed topics then).
    pub fn has_members(&self, group_id: &str) -> bool {
        self.lock().get(group_id).is_some_and(|g| !g.members.is_empty())
    }
}

enum Joined {
    Now(JoinOutcome),
    Wait(oneshot::Receiver<Result<JoinOutcome, GroupError>>),
}

fn rebalance_timeout(group: &Group) -> Duration {
    group.members.values().map(|m| m.rebalance_timeout).max().unwrap_or(Duration::ZERO)
}

/// Ends the join phase: dynamic members that did not rejoin are dropped (static ones stay
/// until their session expires, as in Kafka), the generation advances, a protocol and a
/// leader that rejoined are chosen, and every waiting member gets its answer. Returns false,
/// changing nothing else, when members are left but none of them rejoined.
fn complete_join(group: &mut Group) -> bool {
    let before = group.members.len();
    group.members.retain(|_, m| m.join_waiter.is_some() || m.instance_id.is_some());
    if group.members.len() < before {
        tracing::info!(group = %group.id, dropped = before - group.members.len(), "members did not rejoin in time");
    }
    let leader_rejoined = group
        .leader
        .as_ref()
        .and_then(|leader| group.seq_of(leader))
        .is_some_and(|seq| group.members[&seq].join_waiter.is_some());
    if !leader_rejoined {
        group.leader = group.members.values().find(|m| m.join_waiter.is_some()).map(|m| m.id.clone());
        if group.leader.is_none() && !group.members.is_empty() {
            return false;
        }
    }
    group.rebalance_epoch += 1;
    group.generation += 1;
    group.stop_timer();
    if group.members.is_empty() {
        group.state = GroupState::Empty;
        group.leader = None;
        return true;
    }
    group.protocol = group.select_protocol();
    group.state = GroupState::CompletingRebalance;
    let leader = group.leader.clone().unwrap_or_default();
    let roster: Vec<(String, Option<String>, Vec<u8>)> =
        group.members.values().map(|m| (m.id.clone(), m.instance_id.clone(), group.metadata_for(m))).collect();
    let now = Instant::now();
    for member in group.members.values_mut() {
        member.last_heartbeat = now;
        let outcome = JoinOutcome {
            generation_id: group.generation,
            protocol_type: group.protocol_type.clone(),
            protocol_name: group.protocol.clone(),
            leader: leader.clone(),
            member_id: member.id.clone(),
            members: if member.id == leader { roster.clone() } else { Vec::new() },
            skip_assignment: false,
        };
        if let Some(waiter) = member.join_waiter.take() {
            let _ = waiter.send(Ok(outcome));
        }
    }
    tracing::info!(group = %group.id, generation = group.generation, members = group.members.len(), %leader, "rebalance: join phase complete");
    true
}

fn new_member_id(request: &JoinRequest) -> String {
    let prefix = request.group_instance_id.as_deref().unwrap_or(if request.client_id.is_empty() {
        "member"
    } else {
        &request.client_id
    });
    let prefix: String = prefix.chars().take(200).collect();
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn ms(value: i32) -> Duration {
    Duration::from_millis(value.max(0) as u64)
}
