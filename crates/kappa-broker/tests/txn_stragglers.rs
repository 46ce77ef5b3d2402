//! A delayed EndTxn must not end the producer's next transaction: requests for a
//! transactional id that arrive on a connection older than the newest one it used are
//! refused; transactional batches outside their ongoing transaction are refused. Real
//! broker, real log, raw protocol over sockets.

use std::sync::Arc;

use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::{
    AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, ApiKey, EndTxnRequest, EndTxnResponse,
    InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse, ProducerId, TopicName,
    TransactionalId,
};
use kafka_protocol::protocol::StrBytes;
use kappa_broker::{Broker, BrokerConfig, Limits};
use kappa_log::{Log, LogOptions};
use tokio::net::{TcpListener, TcpStream};

mod common;

use common::call;

const INVALID_TXN_STATE: i16 = 48;

fn add_partitions(pid: i64, epoch: i16) -> AddPartitionsToTxnRequest {
    let mut topic = AddPartitionsToTxnTopic::default();
    topic.name = TopicName(StrBytes::from_static_str("out"));
    topic.partitions = vec![0];
    let mut request = AddPartitionsToTxnRequest::default();
    request.v3_and_below_transactional_id = TransactionalId(StrBytes::from_static_str("tx"));
    request.v3_and_below_producer_id = ProducerId(pid);
    request.v3_and_below_producer_epoch = epoch;
    request.v3_and_below_topics = vec![topic];
    request
}

fn end_txn(pid: i64, epoch: i16, committed: bool) -> EndTxnRequest {
    let mut request = EndTxnRequest::default();
    request.transactional_id = TransactionalId(StrBytes::from_static_str("tx"));
    request.producer_id = ProducerId(pid);
    request.producer_epoch = epoch;
    request.committed = committed;
    request
}

fn init_producer_id(transactional_id: &'static str) -> InitProducerIdRequest {
    let mut request = InitProducerIdRequest::default();
    request.transactional_id = Some(TransactionalId(StrBytes::from_static_str(transactional_id)));
    request.transaction_timeout_ms = 60_000;
    request
}

/// A log with the topic "out" and a broker for it on a loopback port, not yet serving.
async fn open_broker() -> (tempfile::TempDir, Arc<Log>, TcpListener, Arc<Broker>) {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogOptions::default()).unwrap().0);
    log.create_topic("out", 1, &Default::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = i32::from(listener.local_addr().unwrap().port());
    let broker =
        Broker::open(log.clone(), BrokerConfig { advertised_port: port, ..BrokerConfig::default() }).await.unwrap();
    (dir, log, listener, broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_txn_from_a_superseded_connection_does_not_end_the_next_transaction() {
    let (_dir, log, listener, broker) = open_broker().await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));

    // The producer's first connection: init and transaction 1.
    let mut old = TcpStream::connect(addr).await.unwrap();
    let init = init_producer_id("tx");
    let init: InitProducerIdResponse = call(&mut old, ApiKey::InitProducerId, 1, &init).await;
    let (pid, epoch) = (init.producer_id.0, init.producer_epoch);
    let added: AddPartitionsToTxnResponse =
        call(&mut old, ApiKey::AddPartitionsToTxn, 1, &add_partitions(pid, epoch)).await;
    assert_eq!(added.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code, 0);

    // Its EndTxn is "delayed"; the client moves to a new connection, retries the EndTxn
    // there (success) and begins transaction 2.
    let mut new = TcpStream::connect(addr).await.unwrap();
    let ended: EndTxnResponse = call(&mut new, ApiKey::EndTxn, 1, &end_txn(pid, epoch, true)).await;
    assert_eq!(ended.error_code, 0);
    let added: AddPartitionsToTxnResponse =
        call(&mut new, ApiKey::AddPartitionsToTxn, 1, &add_partitions(pid, epoch)).await;
    assert_eq!(added.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code, 0);
    let partition = log.partition("out", 0).unwrap();
    let markers_before = partition.log_end_offset();

    // The straggler finally arrives on the old connection: refused, nothing written.
    let late: EndTxnResponse = call(&mut old, ApiKey::EndTxn, 1, &end_txn(pid, epoch, true)).await;
    assert_eq!(late.error_code, INVALID_TXN_STATE);
    assert_eq!(partition.log_end_offset(), markers_before, "no marker was written for transaction 2");

    // Transaction 2 still ends normally on the current connection.
    let ended: EndTxnResponse = call(&mut new, ApiKey::EndTxn, 1, &end_txn(pid, epoch, false)).await;
    assert_eq!(ended.error_code, 0);
    assert_eq!(partition.log_end_offset(), markers_before + 1, "transaction 2's abort marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kappas_reserved_transactional_ids_are_refused_to_clients() {
    let (_dir, _log, listener, broker) = open_broker().await;
    let addr = listener.local_addr().unwrap();
    // kappa's own HTTP producer holds the id (as kappa-http does at start).
    let (pid, epoch) = broker.transactions().init_producer_id(Some("__kappa.http.0"), 60_000, None).await.unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));

    let mut client = TcpStream::connect(addr).await.unwrap();
    let init = init_producer_id("__kappa.http.0");
    let init: InitProducerIdResponse = call(&mut client, ApiKey::InitProducerId, 1, &init).await;
    const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    assert_eq!(init.error_code, TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "a client may not take over kappa's id");
    // Nor may it guess the producer id and epoch and end kappa's transactions.
    let mut end = end_txn(pid, epoch, true);
    end.transactional_id = TransactionalId(StrBytes::from_static_str("__kappa.http.0"));
    let ended: EndTxnResponse = call(&mut client, ApiKey::EndTxn, 1, &end).await;
    assert_eq!(ended.error_code, INVALID_TXN_STATE);
}

fn produce_txn(pid: i64, epoch: i16, sequence: i32, transactional_id: Option<&'static str>) -> ProduceRequest {
    let records = kappa_log::records::BatchBuilder::new()
        .producer(pid, epoch, sequence)
        .transactional(true)
        .record(kappa_log::records::NewRecord::new(Some(b"k"), Some(b"v"), 1))
        .build();
    common::produce_request("out", records, transactional_id)
}

fn produce_code(response: &ProduceResponse) -> i16 {
    response.responses[0].partition_responses[0].error_code
}

/// A transactional batch is written only into an ongoing transaction of its producer that
/// includes the partition: a batch for a partition never added, or arriving after its
/// transaction ended, would open a transaction no marker closes and hold the partition's
/// last stable offset (and every read_committed reader and view) forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_batches_outside_their_ongoing_transaction_are_refused() {
    let (_dir, log, listener, broker) = open_broker().await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));
    let partition = log.partition("out", 0).unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let init = init_producer_id("tx");
    let init: InitProducerIdResponse = call(&mut client, ApiKey::InitProducerId, 1, &init).await;
    let (pid, epoch) = (init.producer_id.0, init.producer_epoch);

    // Not added with AddPartitionsToTxn yet: refused, nothing written.
    let refused: ProduceResponse = call(&mut client, ApiKey::Produce, 3, &produce_txn(pid, epoch, 0, Some("tx"))).await;
    assert_eq!(produce_code(&refused), INVALID_TXN_STATE);
    // No transactional id on the request: refused too.
    let refused: ProduceResponse = call(&mut client, ApiKey::Produce, 3, &produce_txn(pid, epoch, 0, None)).await;
    assert_eq!(produce_code(&refused), INVALID_TXN_STATE);
    assert_eq!(partition.log_end_offset(), 0);

    // Added: written, and the open transaction holds the last stable offset.
    let added: AddPartitionsToTxnResponse =
        call(&mut client, ApiKey::AddPartitionsToTxn, 1, &add_partitions(pid, epoch)).await;
    assert_eq!(added.results_by_topic_v3_and_below[0].results_by_partition[0].partition_error_code, 0);
    let written: ProduceResponse = call(&mut client, ApiKey::Produce, 3, &produce_txn(pid, epoch, 0, Some("tx"))).await;
    assert_eq!(produce_code(&written), 0);
    assert_eq!(partition.last_stable_offset(), 0);
    // A stale epoch is fenced by the coordinator as well as by the log.
    let fenced: ProduceResponse =
        call(&mut client, ApiKey::Produce, 3, &produce_txn(pid, epoch - 1, 1, Some("tx"))).await;
    assert_ne!(produce_code(&fenced), 0);

    // Committed: a late batch of the same producer (no new AddPartitionsToTxn) is refused,
    // so the partition's last stable offset reaches its end and stays there.
    let ended: EndTxnResponse = call(&mut client, ApiKey::EndTxn, 1, &end_txn(pid, epoch, true)).await;
    assert_eq!(ended.error_code, 0);
    let end = partition.log_end_offset();
    let late: ProduceResponse = call(&mut client, ApiKey::Produce, 3, &produce_txn(pid, epoch, 1, Some("tx"))).await;
    assert_eq!(produce_code(&late), INVALID_TXN_STATE);
    assert_eq!((partition.log_end_offset(), partition.last_stable_offset()), (end, end));
}
