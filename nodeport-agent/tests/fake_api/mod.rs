//! An in-process fake of the Kubernetes API server, good enough for kube-rs's `watcher`.
//!
//! It serves, over plain HTTP/1.1 on 127.0.0.1, the list and watch endpoints of three
//! collections: `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices` and
//! `/api/v1/nodes`, all namespaces.
//!
//! * **List** (`GET <path>`): `{"kind":"<Kind>List","apiVersion":..,"metadata":
//!   {"resourceVersion":"N"},"items":[..]}` with the current objects, N being the world's
//!   resourceVersion. `limit`/`continue` pagination is honoured (pages are cut from a copy taken
//!   at the first page, as the real server serves them from one snapshot); `resourceVersion` and
//!   `resourceVersionMatch` are recorded but ignored (the fake has no stale cache).
//! * **Watch** (`GET <path>?watch=true&resourceVersion=N`): a chunked stream of
//!   newline-delimited `{"type":..,"object":..}` events. Events after N are replayed from the
//!   world's history first, then live events follow. A resourceVersion older than the last
//!   compaction gets a single `ERROR` 410 `Expired` event and the stream ends, like the real
//!   server's "too old resource version". `timeoutSeconds` is recorded but not enforced.
//! * `fieldSelector` with `metadata.name`/`metadata.namespace` equality is applied to lists and
//!   watches; any other field selector, and any label selector, is refused with 400.
//! * **Events** (`POST /apis/events.k8s.io/v1/namespaces/<ns>/events`): stored as sent and
//!   echoed back with 201, for [`FakeApi::events`] (the agent's Events on refused Services).
//! * Everything else gets a 404 `Status` and is reported by [`FakeApi::unexpected_requests`]
//!   (kube-rs should not call discovery for typed resources).
//!
//! The test drives a scripted world: objects and a single resourceVersion counter shared by
//! all collections (as etcd's revision is), changed with [`FakeApi::apply`] /
//! [`FakeApi::delete`], and faults: watch `ERROR` 410, abruptly aborted or cleanly ended watch
//! streams, bookmarks, lists failing with 500, lists held until released, and connections
//! reset at accept. Every request is recorded *after* the server has registered it (a watch is
//! live, a held list is waiting), and [`FakeApi::wait_for_request`] lets the test await one
//! instead of sleeping.
//!
//! Limits: no authentication, TLS, HTTP/2, protobuf, `sendInitialEvents` streaming lists,
//! label selectors, server-side watch timeouts or per-object `resourceVersion` preconditions.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{Method, StatusCode, header},
    response::Response,
    serve::Listener,
};
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

/// How long a test waits for something that should happen promptly (a failure guard only).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The collections the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Res {
    Services,
    EndpointSlices,
    Nodes,
}

impl Res {
    pub fn path(self) -> &'static str {
        match self {
            Res::Services => "/api/v1/services",
            Res::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Res::Nodes => "/api/v1/nodes",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Services => "Service",
            Res::EndpointSlices => "EndpointSlice",
            Res::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::Services | Res::Nodes => "v1",
            Res::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        [Res::Services, Res::EndpointSlices, Res::Nodes]
            .into_iter()
            .find(|res| res.path() == path)
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub resource: Option<Res>,
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub at: Instant,
}

impl Recorded {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    pub fn is_watch_of(&self, res: Res) -> bool {
        self.resource == Some(res) && self.param("watch") == Some("true")
    }

    pub fn is_list_of(&self, res: Res) -> bool {
        self.resource == Some(res) && self.param("watch") != Some("true")
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.param("resourceVersion")
    }
}

type Key = (String, String);

struct Conn {
    selector: Vec<(String, String)>,
    tx: mpsc::UnboundedSender<io::Result<String>>,
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, event line, object) for replay to watches that start behind.
    history: Vec<(u64, String, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    watches: Vec<Conn>,
    failing_lists: usize,
    gate: Option<watch::Sender<bool>>,
}

struct World {
    rv: u64,
    collections: HashMap<Res, Collection>,
    /// Remaining items of paginated lists, by continue token.
    pages: HashMap<String, (u64, Vec<Value>)>,
    next_token: u64,
    reset_connections: bool,
}

struct Shared {
    world: Mutex<World>,
    /// Events created, as sent.
    events: Mutex<Vec<Value>>,
    requests: watch::Sender<Vec<Recorded>>,
    /// Connections dropped at accept while `reset_connections` is on.
    resets: watch::Sender<usize>,
}

/// A running fake API server; clones share it. It lives as long as the test's runtime.
#[derive(Clone)]
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl FakeApi {
    /// Starts the server on an ephemeral port, with an empty world at resourceVersion 1.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            world: Mutex::new(World {
                rv: 1,
                collections: HashMap::new(),
                pages: HashMap::new(),
                next_token: 0,
                reset_connections: false,
            }),
            events: Mutex::new(Vec::new()),
            requests: watch::Sender::new(Vec::new()),
            resets: watch::Sender::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("local address");
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let listener = FaultyListener {
            inner: listener,
            shared: Arc::clone(&shared),
        };
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeApi { shared, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("url"));
        kube::Client::try_from(config).expect("kube client")
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.shared.world()
    }

    /// The world's current resourceVersion (that of the last change).
    pub fn resource_version(&self) -> u64 {
        self.world().rv
    }

    /// Creates or replaces an object (`metadata.namespace`/`name` identify it); watches see
    /// ADDED or MODIFIED. Returns its new resourceVersion.
    pub fn apply(&self, res: Res, mut object: Value) -> u64 {
        let mut world = self.world();
        world.rv += 1;
        let rv = world.rv;
        let key = key_of(&object);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{}-{}-{}", res.kind(), key.0, key.1));
        let collection = world.collections.entry(res).or_default();
        let kind = if collection.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        collection.objects.insert(key, object.clone());
        collection.emit(res, rv, kind, object);
        rv
    }

    /// Deletes an object; watches see DELETED with its last state at a new resourceVersion.
    pub fn delete(&self, res: Res, namespace: &str, name: &str) -> u64 {
        let mut world = self.world();
        world.rv += 1;
        let rv = world.rv;
        let collection = world.collections.entry(res).or_default();
        let mut object = collection
            .objects
            .remove(&(namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("deleting {namespace}/{name}, which does not exist"));
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        collection.emit(res, rv, "DELETED", object);
        rv
    }

    /// Sends a BOOKMARK at the world's current resourceVersion on every live watch of `res`.
    /// Returns that resourceVersion.
    pub fn bookmark(&self, res: Res) -> u64 {
        let mut world = self.world();
        let rv = world.rv;
        let line = event_line(
            "BOOKMARK",
            &json!({
                "kind": res.kind(),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": rv.to_string()},
            }),
        );
        let collection = world.collections.entry(res).or_default();
        collection
            .watches
            .retain(|conn| conn.tx.send(Ok(line.clone())).is_ok());
        rv
    }

    /// Compacts `res`'s history at the current resourceVersion and tells every live watch of
    /// `res` so with an `ERROR` 410 Expired event, then ends those streams: the watcher must
    /// relist.
    pub fn expire_watches(&self, res: Res) {
        let mut world = self.world();
        let rv = world.rv;
        let collection = world.collections.entry(res).or_default();
        collection.compacted = rv;
        collection.history.clear();
        for conn in collection.watches.drain(..) {
            let status = json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": format!("too old resource version: {rv}"),
                "reason": "Expired",
                "code": 410,
            });
            let _ = conn.tx.send(Ok(event_line("ERROR", &status)));
        }
    }

    /// Ends every live watch of `res` cleanly (the terminating chunk is sent), as the server
    /// does when `timeoutSeconds` runs out.
    pub fn end_watches(&self, res: Res) {
        self.world()
            .collections
            .entry(res)
            .or_default()
            .watches
            .clear();
    }

    /// Aborts every live watch of `res` mid-stream: the connection is closed without the
    /// terminating chunk, as when a load balancer or the network drops it.
    pub fn abort_watches(&self, res: Res) {
        let mut world = self.world();
        for conn in world.collections.entry(res).or_default().watches.drain(..) {
            let _ = conn.tx.send(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "fault injected",
            )));
        }
    }

    /// The next `count` lists of `res` fail with 500 Internal Server Error.
    pub fn fail_next_lists(&self, res: Res, count: usize) {
        self.world()
            .collections
            .entry(res)
            .or_default()
            .failing_lists = count;
    }

    /// Lists of `res` are held (after being recorded) until [`FakeApi::release_lists`]; they
    /// then answer with the world as it is at release time.
    pub fn hold_lists(&self, res: Res) {
        let (gate, _) = watch::channel(false);
        self.world().collections.entry(res).or_default().gate = Some(gate);
    }

    pub fn release_lists(&self, res: Res) {
        if let Some(gate) = self.world().collections.entry(res).or_default().gate.take() {
            gate.send_replace(true);
        }
    }

    /// While on, every new connection is closed as soon as it is accepted.
    pub fn reset_connections(&self, on: bool) {
        self.world().reset_connections = on;
    }

    /// Waits until at least `count` connections have been reset at accept.
    pub async fn wait_for_resets(&self, count: usize) {
        let mut rx = self.shared.resets.subscribe();
        guard("connection resets", rx.wait_for(|resets| *resets >= count))
            .await
            .expect("server gone");
    }

    /// The Events created so far, as sent.
    pub fn events(&self) -> Vec<Value> {
        self.shared.events.lock().unwrap().clone()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.borrow().clone()
    }

    /// Requests for anything but the three collections, or not a GET.
    pub fn unexpected_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.resource.is_none() || r.method != Method::GET)
            .collect()
    }

    /// Waits for the `nth` (0-based) request matching `predicate` and returns it.
    pub async fn wait_for_request(
        &self,
        what: &str,
        nth: usize,
        predicate: impl Fn(&Recorded) -> bool,
    ) -> Recorded {
        let mut rx = self.shared.requests.subscribe();
        let requests = guard(
            what,
            rx.wait_for(|requests| requests.iter().filter(|r| predicate(r)).count() > nth),
        )
        .await
        .expect("server gone");
        requests
            .iter()
            .filter(|r| predicate(r))
            .nth(nth)
            .cloned()
            .unwrap()
    }
}

impl Shared {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    fn record(&self, recorded: Recorded) {
        self.requests
            .send_modify(|requests| requests.push(recorded));
    }
}

/// Awaits `future`, panicking with `what` if it takes longer than [`PATIENCE`].
pub async fn guard<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

impl Collection {
    fn emit(&mut self, res: Res, rv: u64, kind: &str, mut object: Value) {
        object["kind"] = json!(res.kind());
        object["apiVersion"] = json!(res.api_version());
        let line = event_line(kind, &object);
        self.watches.retain(|conn| {
            !matches(&conn.selector, &object) || conn.tx.send(Ok(line.clone())).is_ok()
        });
        self.history.push((rv, line, object));
    }
}

fn event_line(kind: &str, object: &Value) -> String {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    line
}

fn key_of(object: &Value) -> Key {
    let field = |name: &str| {
        object["metadata"][name]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    (field("namespace"), field("name"))
}

fn matches(selector: &[(String, String)], object: &Value) -> bool {
    let (namespace, name) = key_of(object);
    selector.iter().all(|(field, value)| match field.as_str() {
        "metadata.name" => *value == name,
        "metadata.namespace" => *value == namespace,
        _ => false,
    })
}

fn parse_selector(selector: Option<&String>) -> Result<Vec<(String, String)>, String> {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    selector
        .split(',')
        .map(|term| {
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("unsupported field selector term {term:?}"))?;
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(format!("unsupported field selector field {field:?}"));
            }
            Ok((field.to_string(), value.to_string()))
        })
        .collect()
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn json_response(body: &Value) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let api = &*shared;
    let query = parse_query(request.uri().query());
    let recorded = Recorded {
        resource: Res::from_path(request.uri().path()),
        method: request.method().clone(),
        path: request.uri().path().to_string(),
        query,
        at: Instant::now(),
    };
    let is_event = recorded.method == Method::POST
        && recorded
            .path
            .starts_with("/apis/events.k8s.io/v1/namespaces/")
        && recorded.path.ends_with("/events");
    if is_event {
        api.record(recorded);
        let body = axum::body::to_bytes(request.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        api.events.lock().unwrap().push(event.clone());
        return Response::builder()
            .status(StatusCode::CREATED)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(event.to_string()))
            .unwrap();
    }
    let Some(res) = recorded.resource.filter(|_| recorded.method == Method::GET) else {
        let path = recorded.path.clone();
        api.record(recorded);
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no {path} here"),
        );
    };
    if recorded.query.contains_key("labelSelector") {
        api.record(recorded);
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "label selectors are not supported",
        );
    }
    let selector = match parse_selector(recorded.query.get("fieldSelector")) {
        Ok(selector) => selector,
        Err(message) => {
            api.record(recorded);
            return status(StatusCode::BAD_REQUEST, "BadRequest", &message);
        }
    };
    if recorded.param("watch") == Some("true") {
        watch_response(api, res, selector, recorded)
    } else {
        list_response(api, res, selector, recorded).await
    }
}

fn watch_response(
    api: &Shared,
    res: Res,
    selector: Vec<(String, String)>,
    recorded: Recorded,
) -> Response {
    let from: u64 = match recorded.resource_version().map(str::parse) {
        Some(Ok(rv)) => rv,
        _ => {
            api.record(recorded);
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the fake needs a numeric resourceVersion to watch from",
            );
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<io::Result<String>>();
    {
        let mut world = api.world();
        let collection = world.collections.entry(res).or_default();
        if from < collection.compacted {
            let status = json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": format!("too old resource version: {from} ({})", collection.compacted),
                "reason": "Expired",
                "code": 410,
            });
            let _ = tx.send(Ok(event_line("ERROR", &status)));
            drop(tx);
        } else {
            for (rv, line, object) in &collection.history {
                if *rv > from && matches(&selector, object) {
                    let _ = tx.send(Ok(line.clone()));
                }
            }
            collection.watches.push(Conn { selector, tx });
        }
        // Recorded while the watch is registered, so events the test makes after seeing the
        // request reach it.
        drop(world);
        api.record(recorded);
    }
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn list_response(
    api: &Shared,
    res: Res,
    selector: Vec<(String, String)>,
    recorded: Recorded,
) -> Response {
    let continue_token = recorded.param("continue").map(str::to_string);
    let limit: Option<usize> = recorded.param("limit").and_then(|l| l.parse().ok());
    let gate = {
        let mut world = api.world();
        let collection = world.collections.entry(res).or_default();
        if collection.failing_lists > 0 {
            collection.failing_lists -= 1;
            drop(world);
            api.record(recorded);
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "fault injected: list failed",
            );
        }
        let gate = collection.gate.as_ref().map(watch::Sender::subscribe);
        drop(world);
        api.record(recorded);
        gate
    };
    if let Some(mut gate) = gate {
        // An error means the gate was dropped: open.
        let _ = gate.wait_for(|open| *open).await;
    }
    let mut world = api.world();
    let (rv, items) = match continue_token {
        Some(token) => match world.pages.remove(&token) {
            Some(page) => page,
            None => {
                return status(StatusCode::GONE, "Expired", "unknown continue token");
            }
        },
        None => {
            let rv = world.rv;
            let collection = world.collections.entry(res).or_default();
            let items = collection
                .objects
                .values()
                .filter(|object| matches(&selector, object))
                .cloned()
                .collect();
            (rv, items)
        }
    };
    let mut items: Vec<Value> = items;
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = limit.filter(|&limit| limit > 0 && items.len() > limit) {
        let rest = items.split_off(limit);
        world.next_token += 1;
        let token = format!("page-{}", world.next_token);
        world.pages.insert(token.clone(), (rv, rest));
        metadata["continue"] = json!(token);
    }
    json_response(&json!({
        "kind": format!("{}List", res.kind()),
        "apiVersion": res.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

/// A TCP listener that can reset connections at accept (see [`FakeApi::reset_connections`]).
struct FaultyListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl Listener for FaultyListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Ok((stream, addr)) = self.inner.accept().await else {
                continue;
            };
            if self.shared.world().reset_connections {
                drop(stream);
                self.shared.resets.send_modify(|resets| *resets += 1);
                continue;
            }
            // Events are small writes; without this, Nagle and delayed ACKs hold them ~40 ms
            // (the real API server, in Go, sets it too).
            let _ = stream.set_nodelay(true);
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}
