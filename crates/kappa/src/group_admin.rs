//! The broker's consumer groups as the HTTP API sees them ([`kappa_http::groups::GroupAdmin`]):
//! kappa-http does not depend on the broker, so `serve` hands it this.

use std::sync::Arc;

use kappa_broker::Broker;
use kappa_broker::kafka_protocol::messages::ConsumerProtocolAssignment;
use kappa_broker::kafka_protocol::protocol::Decodable;
use kappa_coordinator::CommittedOffset;
use kappa_http::groups::{BoxFuture, GroupAdmin, GroupAdminError, GroupDetails, GroupMember, GroupSummary};

pub struct BrokerGroups(pub Arc<Broker>);

impl GroupAdmin for BrokerGroups {
    fn check_group_id(&self, group: &str) -> Result<(), GroupAdminError> {
        self.0.groups().check_group_id(group).map_err(|e| GroupAdminError::InvalidGroupId(e.to_string()))
    }

    fn list(&self) -> Vec<GroupSummary> {
        let coordinator = self.0.groups();
        let mut out: Vec<GroupSummary> = coordinator
            .list()
            .into_iter()
            .map(|(group, protocol_type, state)| GroupSummary {
                members: coordinator.describe(&group).members.len(),
                group,
                state: state.to_owned(),
                protocol_type,
            })
            .collect();
        // Groups known only by their committed offsets (e.g. after a restart) are Empty.
        for group in self.0.offsets().groups() {
            if !out.iter().any(|g| g.group == group) {
                out.push(GroupSummary { group, state: "Empty".into(), protocol_type: "consumer".into(), members: 0 });
            }
        }
        out.sort_by(|a, b| a.group.cmp(&b.group));
        out
    }

    fn describe(&self, group: &str) -> Option<GroupDetails> {
        let description = self.0.groups().describe(group);
        let offsets: Vec<(String, i32, i64)> = self
            .0
            .offsets()
            .fetch(group, None)
            .into_iter()
            .filter_map(|((topic, partition), committed)| committed.map(|c| (topic, partition, c.offset)))
            .collect();
        if description.state == "Dead" && offsets.is_empty() {
            return None;
        }
        let members = description
            .members
            .into_iter()
            .map(|m| GroupMember {
                assignment: decode_assignment(&m.assignment),
                member_id: m.member_id,
                instance_id: m.group_instance_id,
                client_id: m.client_id,
                client_host: m.client_host,
            })
            .collect();
        let state = if description.state == "Dead" { "Empty" } else { description.state };
        Some(GroupDetails {
            group: group.to_owned(),
            state: state.to_owned(),
            protocol: description.protocol,
            members,
            offsets,
        })
    }

    fn commit(
        &self,
        group: &str,
        offsets: Vec<(String, i32, i64)>,
        force: bool,
    ) -> BoxFuture<'_, Result<(), GroupAdminError>> {
        let group = group.to_owned();
        Box::pin(async move {
            let members = self.0.groups().describe(&group).members.len();
            if members > 0 && !force {
                return Err(GroupAdminError::Active { group, members });
            }
            let now = self.0.log().clock().now_ms();
            let offsets = offsets
                .into_iter()
                .map(|(topic, partition, offset)| {
                    let committed =
                        CommittedOffset { offset, leader_epoch: -1, metadata: String::new(), commit_timestamp: now };
                    ((topic, partition), committed)
                })
                .collect();
            self.0.offsets().commit(&group, offsets).await.map_err(|e| GroupAdminError::Failed(e.to_string()))
        })
    }
}

/// A consumer-protocol assignment (version, then topics with partitions); anything else
/// (another protocol type, or nothing assigned yet) is shown as no partitions.
fn decode_assignment(bytes: &[u8]) -> Vec<(String, Vec<i32>)> {
    if bytes.len() < 2 {
        return Vec::new();
    }
    let version = i16::from_be_bytes([bytes[0], bytes[1]]);
    let mut rest = bytes::Bytes::copy_from_slice(&bytes[2..]);
    match ConsumerProtocolAssignment::decode(&mut rest, version.clamp(0, 3)) {
        Ok(assignment) => assignment
            .assigned_partitions
            .into_iter()
            .map(|tp| (tp.topic.0.as_str().to_owned(), tp.partitions))
            .collect(),
        Err(_) => Vec::new(),
    }
}
