//! A tiny gRPC service shaped like a querier's calls to a live-store: a unary
//! search (small request, small response) and a server-streaming fetch (small
//! request, many large messages). Messages are hand-written prost types and the
//! service is served and called through tonic's generic `Grpc` machinery, so no
//! protoc or build script is needed.

use std::{
    convert::Infallible,
    net::SocketAddr,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use tonic::{
    body::BoxBody,
    client::Grpc,
    codec::ProstCodec,
    codegen::{http, BoxFuture, Service},
    server::{NamedService, ServerStreamingService, UnaryService},
    transport::{Channel, Endpoint},
    Request, Response, Status,
};

pub const SERVICE: &str = "rdbench.LiveStore";
pub const UNARY_PATH: &str = "/rdbench.LiveStore/Search";
pub const STREAM_PATH: &str = "/rdbench.LiveStore/Fetch";

pub type Client = Grpc<Channel>;

/// HTTP/2 windows as a Go gRPC server/client grows them under load; h2's 64 KiB
/// default would make bulk throughput a flow-control figure, not a path figure.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONN_WINDOW: u32 = 8 << 20;

#[derive(Clone, PartialEq, prost::Message)]
pub struct SearchRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub query: Bytes,
    /// Bytes per response message.
    #[prost(uint32, tag = "2")]
    pub response_bytes: u32,
    /// Messages to stream back (Fetch only).
    #[prost(uint32, tag = "3")]
    pub messages: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SearchResponse {
    #[prost(bytes = "bytes", tag = "1")]
    pub payload: Bytes,
}

/// Largest response the stand-in hands out; responses are slices of one buffer.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Clone)]
pub struct LiveStoreService {
    payload: Bytes,
}

impl LiveStoreService {
    pub fn new() -> Self {
        Self {
            payload: Bytes::from(vec![0x5a; MAX_RESPONSE]),
        }
    }

    fn slice(&self, n: u32) -> Bytes {
        self.payload.slice(..(n as usize).min(MAX_RESPONSE))
    }
}

impl NamedService for LiveStoreService {
    const NAME: &'static str = SERVICE;
}

struct Search(LiveStoreService);

impl UnaryService<SearchRequest> for Search {
    type Response = SearchResponse;
    type Future = std::future::Ready<Result<Response<SearchResponse>, Status>>;

    fn call(&mut self, request: Request<SearchRequest>) -> Self::Future {
        let n = request.get_ref().response_bytes;
        std::future::ready(Ok(Response::new(SearchResponse {
            payload: self.0.slice(n),
        })))
    }
}

struct Fetch(LiveStoreService);

type FetchStream = tokio_stream::Iter<std::iter::RepeatN<Result<SearchResponse, Status>>>;

impl ServerStreamingService<SearchRequest> for Fetch {
    type Response = SearchResponse;
    type ResponseStream = FetchStream;
    type Future = std::future::Ready<Result<Response<FetchStream>, Status>>;

    fn call(&mut self, request: Request<SearchRequest>) -> Self::Future {
        let req = request.get_ref();
        let msg = SearchResponse {
            payload: self.0.slice(req.response_bytes),
        };
        let stream = tokio_stream::iter(std::iter::repeat_n(Ok(msg), req.messages as usize));
        std::future::ready(Ok(Response::new(stream)))
    }
}

impl Service<http::Request<BoxBody>> for LiveStoreService {
    type Response = http::Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        let svc = self.clone();
        match req.uri().path() {
            UNARY_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(
                    ProstCodec::<SearchResponse, SearchRequest>::default(),
                );
                Ok(grpc.unary(Search(svc), req).await)
            }),
            STREAM_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(
                    ProstCodec::<SearchResponse, SearchRequest>::default(),
                );
                Ok(grpc.server_streaming(Fetch(svc), req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// One HTTP/2 connection to `addr` (tonic opens exactly one per channel).
/// Must run on a runtime whose threads are in the querier namespace.
pub async fn connect(addr: SocketAddr) -> Result<Grpc<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .context("endpoint")?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .connect()
        .await
        .with_context(|| format!("gRPC connect {addr}"))?;
    Ok(Grpc::new(channel))
}

fn path(p: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static(p)
}

/// One unary Search call with a small query and a 1 KiB answer.
pub async fn search(client: &mut Grpc<Channel>) -> Result<SearchResponse, Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let req = SearchRequest {
        query: Bytes::from_static(
            b"{ resource.service.name = \"querier\" } | select(span.http.status_code)",
        ),
        response_bytes: 1024,
        messages: 1,
    };
    client
        .unary(
            Request::new(req),
            path(UNARY_PATH),
            ProstCodec::<SearchRequest, SearchResponse>::default(),
        )
        .await
        .map(Response::into_inner)
}

/// One Fetch call: `messages` messages of `bytes` each; returns payload bytes read.
pub async fn fetch(client: &mut Grpc<Channel>, messages: u32, bytes: u32) -> Result<u64, Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let req = SearchRequest {
        query: Bytes::from_static(b"fetch"),
        response_bytes: bytes,
        messages,
    };
    let mut stream = client
        .server_streaming(
            Request::new(req),
            path(STREAM_PATH),
            ProstCodec::<SearchRequest, SearchResponse>::default(),
        )
        .await?
        .into_inner();
    let mut total = 0u64;
    while let Some(msg) = stream.message().await? {
        total += msg.payload.len() as u64;
    }
    Ok(total)
}
