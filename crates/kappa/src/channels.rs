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

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use compact_str::CompactString;
use smallvec::SmallVec;

use kappa_views::{Event, EventError, Processor, Reducer, Schemas, StateAccess, View};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

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
        .upcaster_typed(CHANNEL_CONTENT_MUTATED, 1, content_v1_to_v2)
}

/// `ChannelContentMutated` v1 as written. Short strings stay inline (`CompactString`):
/// upcasting a replayed v1 event allocates nothing but the v2 encoding.
#[derive(Debug, Deserialize)]
pub struct ContentV1 {
    #[serde(default, rename = "channelId")]
    pub channel_id: Option<CompactString>,
    #[serde(default, rename = "contentId")]
    pub content_id: Option<CompactString>,
    #[serde(default)]
    pub op: Option<CompactString>,
    #[serde(default)]
    pub text: Option<CompactString>,
}

/// `ChannelContentMutated` v2, the current shape.
#[derive(Debug, Serialize)]
pub struct ContentV2 {
    #[serde(rename = "channelId", skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<CompactString>,
    #[serde(rename = "contentId", skip_serializing_if = "Option::is_none")]
    pub content_id: Option<CompactString>,
    pub action: &'static str,
    pub content: Content,
}

/// v1 `{"op":"added","text"}` → v2 `{"action":"upsert","content":{"title":null,"body":text}}`.
pub fn content_v1_to_v2(v1: ContentV1) -> Result<ContentV2, EventError> {
    let action = match v1.op.as_deref() {
        Some("added") | Some("updated") | None => "upsert",
        Some("removed") => "remove",
        Some(other) => {
            return Err(EventError::new(format!("unknown v1 op '{other}' (expected added, updated or removed)")));
        }
    };
    Ok(ContentV2 {
        channel_id: v1.channel_id,
        content_id: v1.content_id,
        action,
        content: Content { title: None, body: v1.text },
    })
}

/// The three views, version 1 each.
pub fn views() -> Vec<View> {
    vec![
        View::reducer("channel_page", 1, &[TOPIC], ChannelPage),
        View::processor("channel_stats", 1, &[TOPIC], ChannelStats),
        View::processor("owner_channels", 1, &[TOPIC], OwnerChannels),
    ]
}

/// What one event means for a channel (borrowing from the event).
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelEvent<'a> {
    /// Created or updated: the channel's full state.
    Upserted {
        name: Option<Cow<'a, str>>,
        owner_id: Option<Cow<'a, str>>,
    },
    /// The item's content is read separately ([`content`]): only `channel_page` needs it.
    ContentUpserted {
        content_id: Cow<'a, str>,
    },
    ContentRemoved {
        content_id: Cow<'a, str>,
    },
    Deleted,
    /// An event type these views do not use.
    Other,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub title: Option<CompactString>,
    pub body: Option<CompactString>,
}

/// The payload fields the views use, borrowed from the record where possible; `C` is
/// the item's content for the view that keeps it (`IgnoredAny` skips it for the others),
/// so each event's payload is parsed once.
#[derive(Deserialize)]
struct Fields<'a, C> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "ownerId")]
    owner_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "contentId")]
    content_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(default)]
    content: C,
}

/// The channel an event is about: the record key, else the payload's channelId.
pub fn channel_id(event: &Event) -> Option<&str> {
    event.key_str().or_else(|| event.field_str("channelId"))
}

/// Interprets an (upcast) event.
pub fn interpret(event: &Event) -> Result<ChannelEvent<'_>, EventError> {
    if let Some(v2) = event.payload_as::<ContentV2>() {
        return interpret_upcast(event, v2);
    }
    interpret_with::<IgnoredAny>(event).map(|(meaning, _)| meaning)
}

/// A v1 `ChannelContentMutated` upcast to v2, read as the upcaster left it (no JSON).
fn interpret_upcast<'e>(event: &'e Event, v2: &'e ContentV2) -> Result<ChannelEvent<'e>, EventError> {
    content_mutation(event, v2.content_id.as_deref().map(Cow::Borrowed), Some(v2.action))
}

/// A `ChannelContentMutated`'s meaning: the `contentId` header wins over the payload's.
fn content_mutation<'e>(
    event: &'e Event,
    payload_content_id: Option<Cow<'e, str>>,
    action: Option<&str>,
) -> Result<ChannelEvent<'e>, EventError> {
    let content_id = event
        .header_str(CONTENT_ID)
        .map(Cow::Borrowed)
        .or(payload_content_id)
        .ok_or_else(|| EventError::new("ChannelContentMutated needs a contentId (header or payload field)"))?;
    match action {
        Some("upsert") => Ok(ChannelEvent::ContentUpserted { content_id }),
        Some("remove") => Ok(ChannelEvent::ContentRemoved { content_id }),
        other => {
            Err(EventError::new(format!("unknown ChannelContentMutated action {other:?} (expected upsert or remove)")))
        }
    }
}

/// Interprets an (upcast) event and decodes its content as `C` in the same pass.
fn interpret_with<'e, C: Deserialize<'e> + Default>(event: &'e Event) -> Result<(ChannelEvent<'e>, C), EventError> {
    let header_content_id = event.header_str(CONTENT_ID);
    let Some(fields) = event.decode::<Fields<C>>()? else {
        let meaning = match header_content_id {
            Some(content_id) => ChannelEvent::ContentRemoved { content_id: Cow::Borrowed(content_id) },
            None => ChannelEvent::Deleted,
        };
        return Ok((meaning, C::default()));
    };
    let meaning = match event.event_type() {
        Some(CHANNEL_CREATED) | Some(CHANNEL_UPDATED) => {
            ChannelEvent::Upserted { name: fields.name, owner_id: fields.owner_id }
        }
        Some(CHANNEL_CONTENT_MUTATED) => content_mutation(event, fields.content_id, fields.action.as_deref())?,
        Some(CHANNEL_DELETED) => ChannelEvent::Deleted,
        _ => ChannelEvent::Other,
    };
    Ok((meaning, fields.content))
}

#[derive(Deserialize)]
struct ContentField {
    #[serde(default)]
    content: Option<Content>,
}

/// The content of a `ChannelContentMutated` upsert (empty when it has none).
pub fn content(event: &Event) -> Result<Content, EventError> {
    Ok(event.decode::<ContentField>()?.and_then(|f| f.content).unwrap_or_default())
}

/// What the event means, with the item's content for an upsert, from one parse of the
/// payload when it can. A `content` field that is not an item's shape only matters on an
/// upsert, so on any error the fields are read again separately to tell which failed.
fn interpret_with_content(event: &Event) -> Result<(ChannelEvent<'_>, Content), EventError> {
    if let Some(v2) = event.payload_as::<ContentV2>() {
        let meaning = interpret_upcast(event, v2)?;
        let content = match meaning {
            ChannelEvent::ContentUpserted { .. } => v2.content.clone(),
            _ => Content::default(),
        };
        return Ok((meaning, content));
    }
    if let Ok((meaning, content)) = interpret_with::<Option<Content>>(event) {
        return Ok((meaning, content.unwrap_or_default()));
    }
    let meaning = interpret(event)?;
    let content = match meaning {
        ChannelEvent::ContentUpserted { .. } => content(event)?,
        _ => Content::default(),
    };
    Ok((meaning, content))
}

/// `channel_page`: channelId → `{"channelId","name","ownerId","content":{"<contentId>":{"title","body"}}}`.
/// Content that arrives before its channel is kept (name and owner null); a deleted
/// channel's key is deleted.
pub struct ChannelPage;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    pub channel_id: CompactString,
    pub name: Option<CompactString>,
    pub owner_id: Option<CompactString>,
    /// Short ids and texts stay inline: 100k pages' items are not 6M separate allocations.
    pub content: Items,
}

/// A page's items by content id. Hashed: an upsert touches one bucket instead of a tree's
/// nodes and key comparisons (a rebuild updates 100k pages in random order, far more than
/// the CPU cache holds). Written as a JSON object in content id order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Items(HashMap<CompactString, Content, hashbrown::DefaultHashBuilder>);

impl Items {
    pub fn insert(&mut self, content_id: &str, content: Content) {
        match self.0.get_mut(content_id) {
            Some(slot) => *slot = content,
            None => {
                self.0.insert(CompactString::from(content_id), content);
            }
        }
    }

    pub fn remove(&mut self, content_id: &str) -> Option<Content> {
        self.0.remove(content_id)
    }

    pub fn get(&self, content_id: &str) -> Option<&Content> {
        self.0.get(content_id)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The items in content id order.
    pub fn sorted(&self) -> Vec<(&str, &Content)> {
        let mut items: Vec<(&str, &Content)> = self.0.iter().map(|(id, content)| (id.as_str(), content)).collect();
        items.sort_unstable_by_key(|(id, _)| *id);
        items
    }
}

impl Serialize for Items {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.sorted())
    }
}

impl Reducer for ChannelPage {
    type State = Page;

    fn key(&self, event: &Event) -> Option<String> {
        channel_id(event).map(str::to_owned)
    }

    fn apply(&self, state: Option<Page>, event: &Event) -> Result<Option<Page>, EventError> {
        let mut page = match state {
            Some(page) => page,
            None => {
                let channel_id = CompactString::from(channel_id(event).unwrap_or_default());
                Page { channel_id, name: None, owner_id: None, content: Items::default() }
            }
        };
        let (meaning, content) = interpret_with_content(event)?;
        match meaning {
            ChannelEvent::Upserted { name, owner_id } => {
                page.name = name.map(CompactString::from);
                page.owner_id = owner_id.map(CompactString::from);
            }
            ChannelEvent::ContentUpserted { content_id } => {
                page.content.insert(&content_id, content);
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
/// the internal key of the same name, so an update of an existing item does not count
/// twice.
pub struct ChannelStats;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub content_count: u64,
}

/// Sets of up to this many ids, each shorter than 256 bytes, are packed into one buffer;
/// larger ones (or one with a longer id) move to a hash set.
pub const PACKED_CONTENT_IDS_MAX: usize = 64;

/// Packed ids up to this many bytes are kept inside the set itself, so in the view cache's
/// entry: no heap buffer to miss in the CPU cache (BENCHMARKS.md run 17).
const PACKED_INLINE_BYTES: usize = 96;

/// A channel's content ids, distinct. A rebuild visits 100k channels in random order, so
/// what matters is how many cache lines a lookup touches: a small set is one buffer of
/// length-prefixed ids (20 short ids are ~70 bytes, scanned front to back, lengths compared
/// first), stored inline up to `PACKED_INLINE_BYTES`, not a vector of strings searched by
/// halving. Serialized as a sorted JSON array
/// (the shape of the `BTreeSet<String>` it replaced, so existing stores read back).
#[derive(Debug, Clone, Default)]
pub struct ContentIds(IdSet);

#[derive(Debug, Clone)]
enum IdSet {
    /// Each id as its length (one byte) and its bytes, in insertion order.
    Packed { bytes: SmallVec<[u8; PACKED_INLINE_BYTES]>, count: usize },
    /// Not boxed: smaller than the inline packed case, so it costs the entry nothing.
    Hashed(HashSet<CompactString>),
}

impl Default for IdSet {
    fn default() -> Self {
        IdSet::Packed { bytes: SmallVec::new(), count: 0 }
    }
}

/// Where the packed id equal to `id` starts (its length byte).
fn packed_position(bytes: &[u8], id: &[u8]) -> Option<usize> {
    let mut at = 0;
    for stored in packed_ids(bytes) {
        // Length, then last byte (ids of one shape differ at the end: "x1", "x2"), so the
        // byte compare (a memcmp call) runs for the likely match only.
        if stored.len() == id.len() && stored.last() == id.last() && stored == id {
            return Some(at);
        }
        at += 1 + stored.len();
    }
    None
}

fn packed_ids(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = usize::from(*bytes.get(at)?);
        let id = &bytes[at + 1..at + 1 + len];
        at += 1 + len;
        Some(id)
    })
}

impl ContentIds {
    /// True when `id` was not there yet.
    pub fn insert(&mut self, id: &str) -> bool {
        match &mut self.0 {
            IdSet::Packed { bytes, count } => {
                if packed_position(bytes, id.as_bytes()).is_some() {
                    return false;
                }
                match u8::try_from(id.len()) {
                    Ok(len) if *count < PACKED_CONTENT_IDS_MAX => {
                        bytes.push(len);
                        bytes.extend_from_slice(id.as_bytes());
                        *count += 1;
                    }
                    _ => {
                        let mut set: HashSet<CompactString> = self.ids().map(CompactString::from).collect();
                        set.insert(CompactString::from(id));
                        self.0 = IdSet::Hashed(set);
                    }
                }
                true
            }
            IdSet::Hashed(set) => set.insert(CompactString::from(id)),
        }
    }

    /// True when `id` was there.
    pub fn remove(&mut self, id: &str) -> bool {
        match &mut self.0 {
            IdSet::Packed { bytes, count } => match packed_position(bytes, id.as_bytes()) {
                Some(at) => {
                    bytes.drain(at..at + 1 + id.len());
                    *count -= 1;
                    true
                }
                None => false,
            },
            IdSet::Hashed(set) => set.remove(id),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        match &self.0 {
            IdSet::Packed { bytes, .. } => packed_position(bytes, id.as_bytes()).is_some(),
            IdSet::Hashed(set) => set.contains(id),
        }
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            IdSet::Packed { count, .. } => *count,
            IdSet::Hashed(set) => set.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids in no particular order.
    pub fn ids(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.0 {
            // Packed ids were copied from `&str`s whole, so they are UTF-8.
            IdSet::Packed { bytes, .. } => {
                Box::new(packed_ids(bytes).map(|id| std::str::from_utf8(id).expect("packed ids are UTF-8")))
            }
            IdSet::Hashed(set) => Box::new(set.iter().map(CompactString::as_str)),
        }
    }

    /// The ids in order.
    pub fn sorted(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.ids().collect();
        ids.sort_unstable();
        ids
    }
}

impl PartialEq for ContentIds {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.ids().all(|id| other.contains(id))
    }
}

impl Eq for ContentIds {}

impl Serialize for ContentIds {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.sorted())
    }
}

impl<'de> Deserialize<'de> for ContentIds {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let listed = Vec::<CompactString>::deserialize(deserializer)?;
        let mut ids = ContentIds::default();
        for id in &listed {
            ids.insert(id);
        }
        Ok(ids)
    }
}

impl Processor for ChannelStats {
    type State = Stats;
    type Internal = ContentIds;

    fn process(&self, event: &Event, state: &mut dyn StateAccess<Stats, ContentIds>) -> Result<(), EventError> {
        let Some(channel) = channel_id(event) else { return Ok(()) };
        match interpret(event)? {
            ChannelEvent::Upserted { .. } => {
                let count = state.peek_internal(channel)?.map_or(0, ContentIds::len);
                state.put(channel, Stats { content_count: count as u64 });
            }
            ChannelEvent::ContentUpserted { content_id } => {
                let mut ids = state.take_internal(channel)?.unwrap_or_default();
                let added = ids.insert(&content_id);
                let count = ids.len() as u64;
                state.put_internal(channel, ids);
                if added || state.peek(channel)?.is_none() {
                    state.put(channel, Stats { content_count: count });
                }
            }
            ChannelEvent::ContentRemoved { content_id } => {
                if let Some(mut ids) = state.take_internal(channel)? {
                    if ids.remove(&content_id) {
                        state.put(channel, Stats { content_count: ids.len() as u64 });
                    }
                    state.put_internal(channel, ids);
                }
            }
            ChannelEvent::Deleted => {
                state.delete(channel);
                state.delete_internal(channel);
            }
            ChannelEvent::Other => {}
        }
        Ok(())
    }
}

/// `owner_channels`: ownerId → `{"channels":[sorted channelIds]}`, following ownership
/// changes and deletions. Keyed by something other than the partition key: every
/// partition's events reach the one processor of this view version, each partition in
/// order, so moving a channel from one owner to another never loses ordering. A channel's
/// current owner is the internal key named after the channel.
pub struct OwnerChannels;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    pub channels: BTreeSet<String>,
}

impl Processor for OwnerChannels {
    type State = Owned;
    type Internal = String;

    fn process(&self, event: &Event, state: &mut dyn StateAccess<Owned, String>) -> Result<(), EventError> {
        let Some(channel) = channel_id(event) else { return Ok(()) };
        let new_owner = match interpret(event)? {
            ChannelEvent::Upserted { owner_id, .. } => owner_id.map(Cow::into_owned),
            ChannelEvent::Deleted => None,
            _ => return Ok(()),
        };
        if state.peek_internal(channel)? == new_owner.as_ref() {
            return Ok(());
        }
        let old_owner = state.get_internal(channel)?;
        if old_owner == new_owner {
            return Ok(());
        }
        if let Some(old) = &old_owner {
            let mut owned = state.take(old)?.unwrap_or_default();
            owned.channels.remove(channel);
            if owned.channels.is_empty() {
                state.delete(old);
            } else {
                state.put(old, owned);
            }
        }
        match new_owner {
            Some(new) => {
                let mut owned = state.take(&new)?.unwrap_or_default();
                owned.channels.insert(channel.to_owned());
                state.put(&new, owned);
                state.put_internal(channel, new);
            }
            None => state.delete_internal(channel),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upcast v1 event is read from the upcaster's typed value; the same event written
    /// as v2 JSON is parsed. Both must mean the same.
    #[test]
    fn upcast_v1_content_means_what_its_v2_json_means() {
        let payloads = [
            serde_json::json!({"channelId": "c1", "contentId": "x1", "op": "added", "text": "hello"}),
            serde_json::json!({"channelId": "c1", "contentId": "x1", "op": "removed"}),
            serde_json::json!({"channelId": "c1", "contentId": "x2"}),
            serde_json::json!({"channelId": "c1", "op": "added", "text": "no content id"}),
        ];
        for v1 in payloads {
            let event = |version, payload| {
                Event::new(TOPIC, 0, 1, Some("c1"), Some(CHANNEL_CONTENT_MUTATED), version, Some(payload))
            };
            let typed = schemas().upcast(event(1, v1.clone())).unwrap();
            assert!(typed.payload_as::<ContentV2>().is_some(), "{v1}");
            let v2 =
                serde_json::to_value(content_v1_to_v2(serde_json::from_value(v1.clone()).unwrap()).unwrap()).unwrap();
            let json = event(2, v2);
            assert!(json.payload_as::<ContentV2>().is_none());
            assert_eq!(interpret(&typed), interpret(&json), "{v1}");
            assert_eq!(interpret_with_content(&typed), interpret_with_content(&json), "{v1}");
        }
    }

    fn ids_of(set: &ContentIds) -> Vec<String> {
        set.sorted().into_iter().map(str::to_owned).collect()
    }

    #[test]
    fn page_items_are_written_in_content_id_order_and_read_back() {
        let mut items = Items::default();
        for id in ["x9", "x10", "a", "x1"] {
            items.insert(id, Content { title: None, body: Some(CompactString::from(id)) });
        }
        items.insert("x9", Content { title: Some("t".into()), body: None });
        assert_eq!(items.len(), 4);
        assert_eq!(items.remove("a").map(|c| c.body), Some(Some(CompactString::from("a"))));
        let json = serde_json::to_string(&items).unwrap();
        assert_eq!(
            json,
            r#"{"x1":{"title":null,"body":"x1"},"x10":{"title":null,"body":"x10"},"x9":{"title":"t","body":null}}"#
        );
        let back: Items = serde_json::from_str(&json).unwrap();
        assert_eq!(back, items);
        assert_eq!(back.get("x9").and_then(|c| c.title.as_deref()), Some("t"));
    }

    #[test]
    fn packed_content_ids_insert_remove_and_serialize_sorted() {
        let mut ids = ContentIds::default();
        assert!(ids.insert("x10"));
        assert!(ids.insert("x2"));
        assert!(ids.insert(""));
        assert!(!ids.insert("x2"), "a second insert of the same id adds nothing");
        assert_eq!(ids.len(), 3);
        assert!(ids.contains("x10") && ids.contains("") && !ids.contains("x1"));
        assert!(ids.remove("x10"));
        assert!(!ids.remove("x10"));
        assert!(ids.insert("x1"));
        assert_eq!(serde_json::to_string(&ids).unwrap(), r#"["","x1","x2"]"#);
        let back: ContentIds = serde_json::from_str(r#"["","x1","x2"]"#).unwrap();
        assert_eq!(back, ids);
        assert!(matches!(ids.0, IdSet::Packed { .. }));
    }

    #[test]
    fn packed_ids_larger_than_the_inline_buffer_stay_packed_and_correct() {
        let names: Vec<String> = (0..40).map(|i| format!("content-{i:02}")).collect();
        assert!(names.iter().map(|n| n.len() + 1).sum::<usize>() > PACKED_INLINE_BYTES);
        let mut ids = ContentIds::default();
        for name in &names {
            assert!(ids.insert(name));
        }
        assert!(matches!(ids.0, IdSet::Packed { .. }));
        assert_eq!(ids_of(&ids), names);
        assert!(ids.remove("content-00") && !ids.contains("content-00") && ids.contains("content-39"));
        assert_eq!(ids.len(), 39);
    }

    #[test]
    fn content_ids_past_the_packed_limit_or_too_long_move_to_a_hash_set_and_keep_every_id() {
        let mut many = ContentIds::default();
        let names: Vec<String> = (0..PACKED_CONTENT_IDS_MAX + 10).map(|i| format!("item-{i:03}")).collect();
        for name in &names {
            assert!(many.insert(name));
        }
        assert!(matches!(many.0, IdSet::Hashed(_)));
        assert_eq!(many.len(), names.len());
        assert_eq!(ids_of(&many), names);
        assert!(!many.insert("item-000") && many.remove("item-000") && !many.contains("item-000"));

        let long = "l".repeat(300);
        let mut ids = ContentIds::default();
        ids.insert("short");
        assert!(ids.insert(&long));
        assert!(matches!(ids.0, IdSet::Hashed(_)));
        assert!(ids.contains(&long) && ids.contains("short"));
        let json = serde_json::to_string(&ids).unwrap();
        let back: ContentIds = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ids);
    }

    #[test]
    fn content_ids_read_back_the_old_sorted_array_and_drop_duplicates() {
        let ids: ContentIds = serde_json::from_str(r#"["a","b","b","c"]"#).unwrap();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids_of(&ids), ["a", "b", "c"]);
    }
}
