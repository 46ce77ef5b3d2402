//! The brief's domain as a ready-made application: channels that hold content.
//!
//! Topic `channels` (4 partitions, compacted, sub-key header `contentId`), record key =
//! channelId. Events (type and version in the `kappa.type` / `kappa.version` headers, or
//! in the JSON payload's `type` / `version` fields):
//! - `ChannelCreated`, `ChannelUpdated` v1 `{"channelId","name","ownerId"}` (full state);
//! - `ChannelContentMutated` with header `contentId`: v1 `{"channelId","contentId","op":"added","text"}`,
//!   v2 `{"channelId","contentId","action":"upsert","content":{"title","body"}}`; a
//!   tombstone with a `contentId` header removes the item;
//! - `ChannelDeleted`: a tombstone without `contentId`.
//!
//! Views: `channel_page`, `channel_stats`, `owner_channels` (see each type).

use std::collections::{BTreeMap, BTreeSet};

use kappa_views::{Event, EventError, Processor, Reducer, Schemas, StateAccess, View};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub const TOPIC: &str = "channels";
pub const PARTITIONS: i32 = 4;
pub const CONTENT_ID: &str = "contentId";

pub const CHANNEL_CREATED: &str = "ChannelCreated";
pub const CHANNEL_UPDATED: &str = "ChannelUpdated";
pub const CHANNEL_CONTENT_MUTATED: &str = "ChannelContentMutated";
pub const CHANNEL_DELETED: &str = "ChannelDeleted";

/// The topic's configuration: compacted per (channelId, contentId).
pub fn topic_configs() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("cleanup.policy".to_owned(), "compact".to_owned()),
        ("kappa.compaction.subkey.header".to_owned(), CONTENT_ID.to_owned()),
    ])
}

/// Event types with their current versions, and the v1 → v2 content upcaster.
pub fn schemas() -> Schemas {
    Schemas::new()
        .event_type(CHANNEL_CREATED, 1)
        .event_type(CHANNEL_UPDATED, 1)
        .event_type(CHANNEL_DELETED, 1)
        .upcaster(CHANNEL_CONTENT_MUTATED, 1, content_v1_to_v2)
}

/// v1 `{"op":"added","text"}` → v2 `{"action":"upsert","content":{"title":null,"body":text}}`.
pub fn content_v1_to_v2(mut v1: Value) -> Result<Value, EventError> {
    let object = v1.as_object_mut().ok_or_else(|| EventError::new("a ChannelContentMutated v1 payload must be a JSON object"))?;
    let op = object.remove("op");
    let action = match op.as_ref().and_then(Value::as_str) {
        Some("added") | Some("updated") | None => "upsert",
        Some("removed") => "remove",
        Some(other) => return Err(EventError::new(format!("unknown v1 op '{other}' (expected added, updated or removed)"))),
    };
    let text = object.remove("text").unwrap_or(Value::Null);
    object.insert("action".to_owned(), json!(action));
    object.insert("content".to_owned(), json!({"title": null, "body": text}));
    object.insert("version".to_owned(), json!(2));
    Ok(v1)
}

/// The three views, version 1 each.
pub fn views() -> Vec<View> {
    vec![
        View::reducer("channel_page", 1, &[TOPIC], ChannelPage),
        View::processor("channel_stats", 1, &[TOPIC], ChannelStats),
        View::processor("owner_channels", 1, &[TOPIC], OwnerChannels),
    ]
}

/// What one event means for a channel.
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelEvent {
    /// Created or updated: the channel's full state.
    Upserted { name: Option<String>, owner_id: Option<String> },
    ContentUpserted { content_id: String, content: Content },
    ContentRemoved { content_id: String },
    Deleted,
    /// An event type these views do not use.
    Other,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub title: Option<String>,
    pub body: Option<String>,
}

/// The channel an event is about: the record key, else the payload's channelId.
pub fn channel_id(event: &Event) -> Option<String> {
    event.key_str().map(str::to_owned).or_else(|| event.field_str("channelId").map(str::to_owned))
}

fn content_id(event: &Event) -> Option<String> {
    event.header_str(CONTENT_ID).or_else(|| event.field_str(CONTENT_ID)).map(str::to_owned)
}

/// Interprets an (upcast) event.
pub fn interpret(event: &Event) -> Result<ChannelEvent, EventError> {
    let Some(payload) = &event.payload else {
        return Ok(match content_id(event) {
            Some(content_id) => ChannelEvent::ContentRemoved { content_id },
            None => ChannelEvent::Deleted,
        });
    };
    let text = |name: &str| payload.get(name).and_then(Value::as_str).map(str::to_owned);
    match event.event_type.as_deref() {
        Some(CHANNEL_CREATED) | Some(CHANNEL_UPDATED) => {
            Ok(ChannelEvent::Upserted { name: text("name"), owner_id: text("ownerId") })
        }
        Some(CHANNEL_CONTENT_MUTATED) => {
            let content_id = content_id(event)
                .ok_or_else(|| EventError::new("ChannelContentMutated needs a contentId (header or payload field)"))?;
            match payload.get("action").and_then(Value::as_str) {
                Some("upsert") => {
                    let content = match payload.get("content") {
                        Some(content) => serde_json::from_value(content.clone())
                            .map_err(|e| EventError::new(format!("content must be {{\"title\",\"body\"}}: {e}")))?,
                        None => Content::default(),
                    };
                    Ok(ChannelEvent::ContentUpserted { content_id, content })
                }
                Some("remove") => Ok(ChannelEvent::ContentRemoved { content_id }),
                other => Err(EventError::new(format!("unknown ChannelContentMutated action {other:?} (expected upsert or remove)"))),
            }
        }
        Some(CHANNEL_DELETED) => Ok(ChannelEvent::Deleted),
        _ => Ok(ChannelEvent::Other),
    }
}

/// `channel_page`: channelId → `{"channelId","name","ownerId","content":{"<contentId>":{"title","body"}}}`.
/// Content that arrives before its channel is kept (name and owner null); a deleted
/// channel's key is deleted.
pub struct ChannelPage;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    pub channel_id: String,
    pub name: Option<String>,
    pub owner_id: Option<String>,
    pub content: BTreeMap<String, Content>,
}

impl Reducer for ChannelPage {
    type State = Page;

    fn key(&self, event: &Event) -> Option<String> {
        channel_id(event)
    }

    fn apply(&self, state: Option<Page>, event: &Event) -> Result<Option<Page>, EventError> {
        let channel_id = channel_id(event).unwrap_or_default();
        let mut page = state.unwrap_or_else(|| Page { channel_id, name: None, owner_id: None, content: BTreeMap::new() });
        match interpret(event)? {
            ChannelEvent::Upserted { name, owner_id } => {
                page.name = name;
                page.owner_id = owner_id;
            }
            ChannelEvent::ContentUpserted { content_id, content } => {
                page.content.insert(content_id, content);
            }
            ChannelEvent::ContentRemoved { content_id } => {
                page.content.remove(&content_id);
            }
            ChannelEvent::Deleted => return Ok(None),
            ChannelEvent::Other => {}
        }
        let empty = page.name.is_none() && page.owner_id.is_none() && page.content.is_empty();
        Ok((!empty).then_some(page))
    }
}

/// `channel_stats`: channelId → `{"contentCount":N}`. Which content ids exist is kept in
/// an internal key per channel, so an update of an existing item does not count twice.
pub struct ChannelStats;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub content_count: u64,
}

fn content_ids_key(channel_id: &str) -> String {
    format!("content-ids/{channel_id}")
}

impl Processor for ChannelStats {
    type State = Stats;

    fn process(&self, event: &Event, state: &mut dyn StateAccess<Stats>) -> Result<(), EventError> {
        let Some(channel) = channel_id(event) else { return Ok(()) };
        let ids_key = content_ids_key(&channel);
        let load_ids = |state: &mut dyn StateAccess<Stats>| -> Result<BTreeSet<String>, EventError> {
            Ok(match state.get_internal(&ids_key)? {
                Some(ids) => serde_json::from_value(ids)?,
                None => BTreeSet::new(),
            })
        };
        match interpret(event)? {
            ChannelEvent::Upserted { .. } => {
                let ids = load_ids(state)?;
                state.put(&channel, Stats { content_count: ids.len() as u64 });
            }
            ChannelEvent::ContentUpserted { content_id, .. } => {
                let mut ids = load_ids(state)?;
                if ids.insert(content_id) {
                    state.put(&channel, Stats { content_count: ids.len() as u64 });
                    state.put_internal(&ids_key, serde_json::to_value(ids)?);
                } else if state.get(&channel)?.is_none() {
                    state.put(&channel, Stats { content_count: ids.len() as u64 });
                }
            }
            ChannelEvent::ContentRemoved { content_id } => {
                let mut ids = load_ids(state)?;
                if ids.remove(&content_id) {
                    state.put(&channel, Stats { content_count: ids.len() as u64 });
                    state.put_internal(&ids_key, serde_json::to_value(ids)?);
                }
            }
            ChannelEvent::Deleted => {
                state.delete(&channel);
                state.delete_internal(&ids_key);
            }
            ChannelEvent::Other => {}
        }
        Ok(())
    }
}

/// `owner_channels`: ownerId → `{"channels":[sorted channelIds]}`, following ownership
/// changes and deletions. Keyed by something other than the partition key: every
/// partition's events reach the one processor of this view version, each partition in
/// order, so moving a channel from one owner to another never loses ordering. The
/// channel's current owner is an internal key.
pub struct OwnerChannels;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    pub channels: BTreeSet<String>,
}

fn owner_key(channel_id: &str) -> String {
    format!("owner/{channel_id}")
}

impl Processor for OwnerChannels {
    type State = Owned;

    fn process(&self, event: &Event, state: &mut dyn StateAccess<Owned>) -> Result<(), EventError> {
        let Some(channel) = channel_id(event) else { return Ok(()) };
        let new_owner = match interpret(event)? {
            ChannelEvent::Upserted { owner_id, .. } => owner_id,
            ChannelEvent::Deleted => None,
            _ => return Ok(()),
        };
        let old_owner = state.get_internal(&owner_key(&channel))?.and_then(|v| v.as_str().map(str::to_owned));
        if old_owner == new_owner {
            return Ok(());
        }
        if let Some(old) = &old_owner {
            let mut owned = state.take(old)?.unwrap_or_default();
            owned.channels.remove(&channel);
            if owned.channels.is_empty() {
                state.delete(old);
            } else {
                state.put(old, owned);
            }
        }
        match &new_owner {
            Some(new) => {
                let mut owned = state.take(new)?.unwrap_or_default();
                owned.channels.insert(channel.clone());
                state.put(new, owned);
                state.put_internal(&owner_key(&channel), json!(new));
            }
            None => state.delete_internal(&owner_key(&channel)),
        }
        Ok(())
    }
}
