//! Consumer groups: JoinGroup, SyncGroup, Heartbeat, LeaveGroup, OffsetCommit,
//! OffsetFetch, ListGroups, DescribeGroups, DeleteGroups, OffsetDelete.

use std::collections::HashSet;

use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic};
use kafka_protocol::messages::offset_delete_response::{OffsetDeleteResponsePartition, OffsetDeleteResponseTopic};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions, OffsetFetchResponseTopic,
    OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse, GroupId,
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    ListGroupsRequest, ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest,
    OffsetDeleteResponse, OffsetFetchRequest, OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kappa_coordinator::offsets::StableOffset;
use kappa_coordinator::{CommittedOffset, GroupError, JoinRequest, SyncRequest};

use super::errors::{self, group_code};
use super::{Broker, ByTopic, str_bytes};
use crate::server::Peer;

fn opt_str(s: &Option<kafka_protocol::protocol::StrBytes>) -> Option<String> {
    s.as_ref().map(|s| s.as_str().to_owned())
}

impl Broker {
    pub(super) async fn join_group(
        &self,
        request: JoinGroupRequest,
        version: i16,
        client_id: String,
        peer: &Peer,
    ) -> JoinGroupResponse {
        let join = JoinRequest {
            group_id: request.group_id.0.as_str().to_owned(),
            member_id: request.member_id.as_str().to_owned(),
            group_instance_id: opt_str(&request.group_instance_id),
            client_id,
            client_host: format!("/{}", peer.addr.ip()),
            session_timeout_ms: request.session_timeout_ms,
            // v0 has no rebalance timeout: Kafka uses the session timeout.
            rebalance_timeout_ms: if version >= 1 { request.rebalance_timeout_ms } else { request.session_timeout_ms },
            protocol_type: request.protocol_type.as_str().to_owned(),
            protocols: request.protocols.iter().map(|p| (p.name.as_str().to_owned(), p.metadata.to_vec())).collect(),
            require_known_member_id: version >= 4,
        };
        let mut response = JoinGroupResponse::default();
        match self.groups.join(join).await {
            Ok(outcome) => {
                response.generation_id = outcome.generation_id;
                response.protocol_type = Some(str_bytes(outcome.protocol_type));
                response.protocol_name = Some(str_bytes(outcome.protocol_name));
                response.leader = str_bytes(outcome.leader);
                response.member_id = str_bytes(outcome.member_id);
                response.skip_assignment = outcome.skip_assignment;
                response.members = outcome
                    .members
                    .into_iter()
                    .map(|(id, instance, metadata)| {
                        let mut m = JoinGroupResponseMember::default();
                        m.member_id = str_bytes(id);
                        m.group_instance_id = instance.map(str_bytes);
                        m.metadata = metadata.into();
                        m
                    })
                    .collect();
            }
            Err(e) => {
                response.error_code = group_code(&e);
                response.generation_id = -1;
                if let GroupError::MemberIdRequired(id) = e {
                    response.member_id = str_bytes(id);
                }
            }
        }
        response
    }

    pub(super) async fn sync_group(&self, request: SyncGroupRequest) -> SyncGroupResponse {
        let sync = SyncRequest {
            group_id: request.group_id.0.as_str().to_owned(),
            generation_id: request.generation_id,
            member_id: request.member_id.as_str().to_owned(),
            group_instance_id: opt_str(&request.group_instance_id),
            assignments: request
                .assignments
                .iter()
                .map(|a| (a.member_id.as_str().to_owned(), a.assignment.to_vec()))
                .collect(),
        };
        let mut response = SyncGroupResponse::default();
        response.protocol_type = request.protocol_type;
        response.protocol_name = request.protocol_name;
        match self.groups.sync(sync).await {
            Ok(assignment) => response.assignment = assignment.into(),
            Err(e) => response.error_code = group_code(&e),
        }
        response
    }

    pub(super) fn heartbeat(&self, request: HeartbeatRequest) -> HeartbeatResponse {
        let mut response = HeartbeatResponse::default();
        let instance = opt_str(&request.group_instance_id);
        if let Err(e) = self.groups.heartbeat(
            request.group_id.0.as_str(),
            request.generation_id,
            request.member_id.as_str(),
            instance.as_deref(),
        ) {
            response.error_code = group_code(&e);
        }
        response
    }

    pub(super) fn leave_group(&self, request: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
        let group = request.group_id.0.as_str();
        let mut response = LeaveGroupResponse::default();
        if version < 3 {
            if let Err(e) = self.groups.leave(group, request.member_id.as_str(), None) {
                response.error_code = group_code(&e);
            }
            return response;
        }
        for member in request.members {
            let instance = opt_str(&member.group_instance_id);
            let mut result = MemberResponse::default();
            if let Err(e) = self.groups.leave(group, member.member_id.as_str(), instance.as_deref()) {
                result.error_code = group_code(&e);
            }
            result.member_id = member.member_id;
            result.group_instance_id = member.group_instance_id;
            response.members.push(result);
        }
        response
    }

    pub(super) async fn offset_commit(&self, request: OffsetCommitRequest) -> OffsetCommitResponse {
        let group = request.group_id.0.as_str().to_owned();
        let instance = opt_str(&request.group_instance_id);
        let now = self.log.clock().now_ms();
        let validation = self.groups.validate_member(
            &group,
            request.generation_id_or_member_epoch,
            request.member_id.as_str(),
            instance.as_deref(),
        );
        let mut offsets = Vec::new();
        let mut codes = Vec::new();
        for topic in &request.topics {
            let name = topic.name.0.as_str();
            for p in &topic.partitions {
                let code = match (&validation, self.log.partition(name, p.partition_index)) {
                    (Err(e), _) => group_code(e),
                    (Ok(()), Err(_)) => errors::UNKNOWN_TOPIC_OR_PARTITION,
                    (Ok(()), Ok(_)) => {
                        let metadata = p.committed_metadata.as_ref().map(|m| m.as_str().to_owned()).unwrap_or_default();
                        offsets.push((
                            (name.to_owned(), p.partition_index),
                            CommittedOffset {
                                offset: p.committed_offset,
                                leader_epoch: p.committed_leader_epoch,
                                metadata,
                                commit_timestamp: now,
                            },
                        ));
                        errors::NONE
                    }
                };
                codes.push((name.to_owned(), p.partition_index, code));
            }
        }
        let stored = if offsets.is_empty() { Ok(()) } else { self.offsets.commit(&group, offsets).await };
        let mut topics = ByTopic::new();
        for (name, index, code) in codes {
            let mut p = OffsetCommitResponsePartition::default();
            p.partition_index = index;
            p.error_code = match (&stored, code) {
                (Err(e), errors::NONE) => group_code(e),
                (_, code) => code,
            };
            let topic = topics.entry(&name, || {
                let mut topic = OffsetCommitResponseTopic::default();
                topic.name = TopicName(str_bytes(name.clone()));
                topic
            });
            topic.partitions.push(p);
        }
        let mut response = OffsetCommitResponse::default();
        response.topics = topics.into_vec();
        response
    }

    /// Committed offsets for OffsetFetch; with require_stable (v7+, set by read_committed
    /// consumers) a partition a transaction holds an offset for is UNSTABLE_OFFSET_COMMIT.
    fn fetch_committed(
        &self,
        group: &str,
        wanted: Option<&[(String, i32)]>,
        require_stable: bool,
    ) -> Vec<((String, i32), StableOffset)> {
        if require_stable {
            return self.offsets.fetch_stable(group, wanted);
        }
        self.offsets.fetch(group, wanted).into_iter().map(|(tp, committed)| (tp, Ok(committed))).collect()
    }

    pub(super) fn offset_fetch(&self, request: OffsetFetchRequest, version: i16) -> OffsetFetchResponse {
        let mut response = OffsetFetchResponse::default();
        // Top-level in v8+ too, covering every group of the request.
        let require_stable = request.require_stable;
        if version >= 8 {
            for group in request.groups {
                let wanted = group.topics.map(|ts| {
                    ts.iter()
                        .flat_map(|t| {
                            t.partition_indexes.iter().map(|&p| (t.name.0.as_str().to_owned(), p)).collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                });
                let mut out = OffsetFetchResponseGroup::default();
                let mut topics = ByTopic::new();
                let fetched = self.fetch_committed(group.group_id.0.as_str(), wanted.as_deref(), require_stable);
                for ((topic, index), committed) in fetched {
                    let mut p = OffsetFetchResponsePartitions::default();
                    p.partition_index = index;
                    fill_committed(
                        (&mut p.committed_offset, &mut p.committed_leader_epoch, &mut p.metadata, &mut p.error_code),
                        committed,
                    );
                    let entry = topics.entry(&topic, || {
                        let mut t = OffsetFetchResponseTopics::default();
                        t.name = TopicName(str_bytes(topic.clone()));
                        t
                    });
                    entry.partitions.push(p);
                }
                out.topics = topics.into_vec();
                out.group_id = group.group_id;
                response.groups.push(out);
            }
            return response;
        }
        let wanted = request.topics.map(|ts| {
            ts.iter()
                .flat_map(|t| {
                    t.partition_indexes.iter().map(|&p| (t.name.0.as_str().to_owned(), p)).collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        });
        let mut topics = ByTopic::new();
        for ((topic, index), committed) in
            self.fetch_committed(request.group_id.0.as_str(), wanted.as_deref(), require_stable)
        {
            let mut p = OffsetFetchResponsePartition::default();
            p.partition_index = index;
            fill_committed(
                (&mut p.committed_offset, &mut p.committed_leader_epoch, &mut p.metadata, &mut p.error_code),
                committed,
            );
            let entry = topics.entry(&topic, || {
                let mut t = OffsetFetchResponseTopic::default();
                t.name = TopicName(str_bytes(topic.clone()));
                t
            });
            entry.partitions.push(p);
        }
        response.topics = topics.into_vec();
        response
    }

    pub(super) fn list_groups(&self, request: ListGroupsRequest) -> ListGroupsResponse {
        let mut response = ListGroupsResponse::default();
        let mut listed: Vec<(String, String, &str)> = self.groups.list();
        let live: HashSet<String> = listed.iter().map(|(id, _, _)| id.clone()).collect();
        // Groups known only from committed offsets (e.g. after a restart) are Empty, with no
        // protocol type (as Kafka lists them, and as DescribeGroups describes them).
        for group in self.offsets.groups() {
            if !live.contains(&group) {
                listed.push((group, String::new(), "Empty"));
            }
        }
        // v4+: only the states asked for (none: all), matched case-insensitively as Kafka does.
        let states = &request.states_filter;
        response.groups = listed
            .into_iter()
            .filter(|(_, _, state)| states.is_empty() || states.iter().any(|s| s.eq_ignore_ascii_case(state)))
            .map(|(id, protocol_type, state)| {
                let mut g = ListedGroup::default();
                g.group_id = GroupId(str_bytes(id));
                g.protocol_type = str_bytes(protocol_type);
                g.group_state = str_bytes(state);
                g.group_type = str_bytes("classic");
                g
            })
            .collect();
        response
    }

    pub(super) fn describe_groups(&self, request: DescribeGroupsRequest) -> DescribeGroupsResponse {
        let mut response = DescribeGroupsResponse::default();
        for id in request.groups {
            let d = self.groups.describe(id.0.as_str());
            let mut g = DescribedGroup::default();
            g.group_id = id;
            g.group_state =
                str_bytes(if d.state == "Dead" && !self.offsets.fetch(d.group_id.as_str(), None).is_empty() {
                    "Empty"
                } else {
                    d.state
                });
            g.protocol_type = str_bytes(d.protocol_type);
            g.protocol_data = str_bytes(d.protocol);
            g.authorized_operations = i32::MIN;
            g.members = d
                .members
                .into_iter()
                .map(|m| {
                    let mut member = DescribedGroupMember::default();
                    member.member_id = str_bytes(m.member_id);
                    member.group_instance_id = m.group_instance_id.map(str_bytes);
                    member.client_id = str_bytes(m.client_id);
                    member.client_host = str_bytes(m.client_host);
                    member.member_metadata = m.metadata.into();
                    member.member_assignment = m.assignment.into();
                    member
                })
                .collect();
            response.groups.push(g);
        }
        response
    }

    pub(super) async fn delete_groups(&self, request: DeleteGroupsRequest) -> DeleteGroupsResponse {
        let mut response = DeleteGroupsResponse::default();
        for id in request.groups_names {
            let name = id.0.as_str().to_owned();
            let had_offsets = !self.offsets.fetch(&name, None).is_empty();
            let outcome = match self.groups.delete(&name) {
                Err(GroupError::GroupIdNotFound) if had_offsets => Ok(()),
                other => other,
            };
            let outcome = match outcome {
                Ok(()) => self.offsets.delete(&name, None).await,
                Err(e) => Err(e),
            };
            let mut result = DeletableGroupResult::default();
            result.group_id = id;
            if let Err(e) = outcome {
                result.error_code = group_code(&e);
            }
            response.results.push(result);
        }
        response
    }

    pub(super) async fn offset_delete(&self, request: OffsetDeleteRequest) -> OffsetDeleteResponse {
        let group = request.group_id.0.as_str().to_owned();
        let mut response = OffsetDeleteResponse::default();
        if self.groups.has_members(&group) {
            // Kafka refuses only subscribed topics; kappa cannot read subscriptions from
            // opaque member metadata, so it refuses while the group has members.
            response.error_code = errors::GROUP_SUBSCRIBED_TO_TOPIC;
            return response;
        }
        // Kafka: a group with neither members nor offsets does not exist.
        if self.groups.group_state(&group).is_none() && self.offsets.fetch(&group, None).is_empty() {
            response.error_code = errors::GROUP_ID_NOT_FOUND;
            return response;
        }
        let partitions: Vec<(String, i32)> = request
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions.iter().map(|p| (t.name.0.as_str().to_owned(), p.partition_index)).collect::<Vec<_>>()
            })
            .collect();
        if let Err(e) = self.offsets.delete(&group, Some(partitions)).await {
            response.error_code = group_code(&e);
            return response;
        }
        for topic in request.topics {
            let mut t = OffsetDeleteResponseTopic::default();
            t.partitions = topic
                .partitions
                .iter()
                .map(|p| {
                    let mut r = OffsetDeleteResponsePartition::default();
                    r.partition_index = p.partition_index;
                    r
                })
                .collect();
            t.name = topic.name;
            response.topics.push(t);
        }
        response
    }
}

/// An OffsetFetch partition's (offset, leader epoch, metadata, error code).
type FetchedFields<'a> = (&'a mut i64, &'a mut i32, &'a mut Option<kafka_protocol::protocol::StrBytes>, &'a mut i16);

fn fill_committed((offset, epoch, metadata, error_code): FetchedFields<'_>, committed: StableOffset) {
    *error_code = committed.as_ref().err().map_or(errors::NONE, group_code);
    match committed {
        Ok(Some(c)) => {
            *offset = c.offset;
            *epoch = c.leader_epoch;
            *metadata = Some(str_bytes(c.metadata));
        }
        Ok(None) | Err(_) => {
            *offset = -1;
            *epoch = -1;
            *metadata = Some(str_bytes(""));
        }
    }
}
