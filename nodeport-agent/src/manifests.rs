//! Services, EndpointSlices and Nodes read from a directory of manifest files instead of a
//! cluster.
//!
//! Files: every `*.yaml`, `*.yml` and `*.json` file under the directory, walked in name order
//! (subdirectories included). Entries whose name starts with `.` are skipped: a ConfigMap
//! mounted as a volume keeps its data behind `..data` and `..<timestamp>` entries next to the
//! visible symlinks, and reading both would define every object twice. Symlinked directories
//! are not followed (no loops); symlinked files are.
//!
//! Each file holds one or more YAML documents separated by `---` (JSON is YAML too). A document
//! is a Kubernetes object or a `kind: List` of them. Services (`v1`), EndpointSlices
//! (`discovery.k8s.io/v1`) and Nodes (`v1`) are kept; every other kind is skipped. The
//! returned objects are normalised the way the API server would store them where the rest of
//! the agent relies on it: `metadata.namespace` defaults to `default` (and is cleared on Nodes,
//! which have none). The files source reads the Node named like the agent's node for its zone
//! label (topology hints); other Nodes are kept here and ignored there.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based position of the YAML document within the file, counted as YAML does: a `---`
    /// on the first line opens document 1 rather than closing an empty one.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)
    }
}

/// The objects of a manifests directory, in file order.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub services: Vec<(Origin, Arc<Service>)>,
    pub endpoint_slices: Vec<(Origin, Arc<EndpointSlice>)>,
    pub nodes: Vec<(Origin, Arc<Node>)>,
}

/// Where in a file an object sits, and which object it is when that is known; displayed as
/// `web.yaml: document 2 (Service default/web)` or, inside a List,
/// `list.yaml: document 1, items[3] (Service default/web)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectLocation {
    pub origin: Origin,
    /// Index in the `items` of a `kind: List` document.
    pub list_item: Option<usize>,
    /// `Service default/web`; `None` when the document is not recognisably an object.
    pub object: Option<String>,
}

impl ObjectLocation {
    /// File, document and list item, without the object.
    pub fn place(&self) -> String {
        match self.list_item {
            Some(item) => format!("{}, items[{item}]", self.origin),
            None => self.origin.to_string(),
        }
    }
}

impl fmt::Display for ObjectLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.place())?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: cannot read the manifests directory: {source}", dir.display())]
    ReadDir { dir: PathBuf, source: io::Error },
    #[error("{}: cannot read: {source}", file.display())]
    ReadFile { file: PathBuf, source: io::Error },
    /// The text is not valid YAML (or JSON); the message carries line and column.
    #[error("{origin}: {message}")]
    Syntax { origin: Origin, message: String },
    /// A file above [`MAX_FILE_BYTES`]: not read at all.
    #[error(
        "{}: {size} bytes, more than the {} MiB a manifest file may hold; split it into several \
         files",
        file.display(),
        limit >> 20
    )]
    TooLarge {
        file: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{location}: not a Kubernetes object: {reason}")]
    NotAnObject {
        location: ObjectLocation,
        reason: String,
    },
    /// A field has the wrong type or a value the API server would reject. `path` is the field
    /// path within the object, e.g. `spec.ports[0].nodePort`.
    #[error("{location}: {path}: {message}")]
    InvalidField {
        location: ObjectLocation,
        path: String,
        message: String,
    },
    /// Nested deeper than `MAX_DEPTH` (found by `nesting_depth` before parsing).
    #[error(
        "{}:{line}: nested more than {limit} levels deep (brackets, braces, indentation); not \
         parsed",
        file.display()
    )]
    TooDeep {
        file: PathBuf,
        line: usize,
        limit: usize,
    },
    /// The same kind, namespace and name twice: the API server would keep only one.
    #[error("{location}: defined twice, first at {}", first.place())]
    Duplicate {
        location: ObjectLocation,
        /// Boxed to keep the error small (clippy::result_large_err).
        first: Box<ObjectLocation>,
    },
}

/// Loads every Service, EndpointSlice and Node of the manifest files under `dir`.
pub fn load_dir(dir: &Path) -> Result<Manifests, ManifestError> {
    load_dir_cached(dir, &mut ParseCache::default())
}

/// Files parsed by earlier loads of one directory. A reload parses only the files whose text
/// changed: after one small file changes, the rest of a large directory costs a read and a
/// comparison, and its objects keep their `Arc`.
#[derive(Default)]
pub struct ParseCache {
    files: HashMap<PathBuf, ParsedFile>,
}

impl ParseCache {
    /// Files whose parse is kept.
    pub fn len(&self) -> usize {
        self.files.len()
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// `load_dir`, reusing (and updating) the parse of files that did not change since `cache` was
/// last used. A failed load leaves the cache usable.
pub fn load_dir_cached(dir: &Path, cache: &mut ParseCache) -> Result<Manifests, ManifestError> {
    let mut files = Vec::new();
    collect_manifest_files(dir, &mut files)?;
    let mut parsed_now = Vec::with_capacity(files.len());
    for file in files {
        let mut previous = cache.files.remove(&file);
        match ParsedFile::refresh(&file, &mut previous) {
            Ok(parsed) => parsed_now.push((file, parsed)),
            Err(err) => {
                // Keep every good parse, also of the files this load took out of the cache.
                cache.files.extend(parsed_now);
                cache.files.extend(previous.map(|parsed| (file, parsed)));
                return Err(err);
            }
        }
    }
    let gathered = gather(&parsed_now);
    cache.files = parsed_now.into_iter().collect();
    gathered
}

/// The objects of the parsed files in order, refusing an object defined twice.
fn gather(files: &[(PathBuf, ParsedFile)]) -> Result<Manifests, ManifestError> {
    let mut manifests = Manifests::default();
    let count = files.iter().map(|(_, file)| file.objects.len()).sum();
    // (kind, namespace, name) -> where it was first defined.
    let mut seen: HashMap<(&'static str, &str, &str), &ObjectLocation> =
        HashMap::with_capacity(count);
    for object in files.iter().flat_map(|(_, file)| &file.objects) {
        let (kind, location, (namespace, name)) = match object {
            ParsedObject::Service(location, key, _) => ("Service", location, key),
            ParsedObject::EndpointSlice(location, key, _) => ("EndpointSlice", location, key),
            ParsedObject::Node(location, key, _) => ("Node", location, key),
        };
        if let Some(first) = seen.insert((kind, namespace, name), location) {
            return Err(ManifestError::Duplicate {
                location: location.clone(),
                first: Box::new(first.clone()),
            });
        }
        match object {
            ParsedObject::Service(location, _, service) => {
                let entry = (location.origin.clone(), service.clone());
                manifests.services.push(entry);
            }
            ParsedObject::EndpointSlice(location, _, slice) => {
                let entry = (location.origin.clone(), slice.clone());
                manifests.endpoint_slices.push(entry);
            }
            ParsedObject::Node(location, _, node) => {
                manifests
                    .nodes
                    .push((location.origin.clone(), node.clone()));
            }
        }
    }
    Ok(manifests)
}

fn collect_manifest_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let read_dir_error = |source| ManifestError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut entries = fs::read_dir(dir)
        .map_err(read_dir_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_dir_error)?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            tracing::debug!(path = %path.display(), "skipping hidden entry");
            continue;
        }
        // DirEntry::file_type does not follow symlinks: a symlinked directory is not entered,
        // a symlinked file is read like any other.
        let file_type = entry.file_type().map_err(read_dir_error)?;
        if file_type.is_dir() {
            collect_manifest_files(&path, files)?;
        } else if is_manifest_file(&path) {
            files.push(path);
        }
    }
    Ok(())
}

fn is_manifest_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|ext| ext.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The objects of one file, as last parsed from a text with this digest.
struct ParsedFile {
    digest: TextDigest,
    objects: Vec<ParsedObject>,
}

/// The SHA-256 of a file's text. A reload compares it rather than the text, which the cache
/// would otherwise keep for every file (45 MB of YAML at 65,536 Services, 64 MiB of heap as
/// read); two different texts with one digest are not met by chance.
type TextDigest = [u8; 32];

fn digest(text: &str) -> TextDigest {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .try_into()
        .expect("SHA-256 digests are 32 bytes")
}

enum ParsedObject {
    Service(ObjectLocation, Key, Arc<Service>),
    EndpointSlice(ObjectLocation, Key, Arc<EndpointSlice>),
    Node(ObjectLocation, Key, Arc<Node>),
}

/// (namespace, name); a Node's namespace is "".
type Key = (String, String);

/// The largest manifest file read. Kubernetes objects are small (the API server takes 1.5 MB
/// per object); this leaves room for thousands of objects in one file.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// The deepest nesting a manifest may have. A Service or EndpointSlice is about 6 levels deep
/// (a List adds 2). Unbounded, the parser reads a whole pathological file before it fails: a
/// 200 kB file of 100,000 nested brackets was reported keeping the loader busy for 25 s,
/// stalling every other file's update (bench/results/*-loader.md has this machine's figures).
pub const MAX_DEPTH: usize = 64;

/// Reads a file of at most `limit` bytes; a larger one is refused before any of it is read.
/// The size is that of the opened file, and the read stops past `limit` in case the file
/// grows meanwhile.
fn read_bounded(file: &Path, limit: u64) -> Result<String, ManifestError> {
    use std::io::Read as _;
    let read_error = |source| ManifestError::ReadFile {
        file: file.to_owned(),
        source,
    };
    let handle = fs::File::open(file).map_err(read_error)?;
    let too_large = |size| ManifestError::TooLarge {
        file: file.to_owned(),
        size,
        limit,
    };
    let size = handle.metadata().map_err(read_error)?.len();
    if size > limit {
        return Err(too_large(size));
    }
    // The file may grow between the two looks: read one byte past the limit at most.
    let mut text = String::with_capacity(size as usize + 1);
    handle
        .take(limit + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > limit {
        return Err(too_large(text.len() as u64));
    }
    Ok(text)
}

/// The first line where YAML (or JSON) `text` nests deeper than `limit`, from one pass over
/// its characters without parsing: flow brackets and braces outside quoted scalars and
/// comments, plus block nesting (levels of increasing indentation, and compact `- - ` entries).
/// It errs towards counting too deep, never too shallow: brackets inside a plain scalar count.
/// Block scalar (`|`, `>`) contents are text and do not count.
pub fn nesting_depth(text: &str, limit: usize) -> Option<usize> {
    let mut flow = 0usize;
    let mut quote: Option<char> = None;
    let mut indents: Vec<usize> = Vec::new();
    // The indentation of the line that opened a block scalar: deeper lines are its text.
    let mut block_scalar: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let body = &line[indent..];
        if quote.is_none() && flow == 0 {
            if let Some(parent) = block_scalar {
                if body.is_empty() || indent > parent {
                    continue;
                }
                block_scalar = None;
            }
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            while indents.last().is_some_and(|top| *top > indent) {
                indents.pop();
            }
            if indents.last() != Some(&indent) {
                indents.push(indent);
            }
        }
        // Compact block sequences nest on one line: `- - - x`.
        let mut dashes = 0;
        let mut rest = body;
        while quote.is_none() && flow == 0 && (rest.starts_with("- ") || rest == "-") {
            dashes += 1;
            rest = rest[1..].trim_start_matches(' ');
        }
        let mut prev: Option<char> = None;
        let mut escaped = false;
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some('"') => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        quote = None;
                    }
                }
                Some(_) => {
                    // `''` is a quote inside single quotes.
                    if c == '\'' && chars.next_if_eq(&'\'').is_none() {
                        quote = None;
                    }
                }
                None => {
                    // A quoted scalar starts where a scalar may start; elsewhere a quote is
                    // part of a plain scalar (`it's`).
                    let at_start = prev.is_none_or(|p| " \t:-[{,?".contains(p));
                    match c {
                        '"' | '\'' if at_start => quote = Some(c),
                        '#' if prev.is_none_or(|p| p == ' ' || p == '\t') => break,
                        '[' | '{' => flow += 1,
                        ']' | '}' => flow = flow.saturating_sub(1),
                        _ => {}
                    }
                }
            }
            if indents.len() + dashes + flow > limit {
                return Some(n + 1);
            }
            prev = Some(c);
        }
        if indents.len() + dashes + flow > limit {
            return Some(n + 1);
        }
        if quote.is_none() && flow == 0 {
            let content = rest.split(" #").next().unwrap_or("").trim_end();
            let indicator =
                content.trim_end_matches(|c: char| c == '-' || c == '+' || c.is_ascii_digit());
            if indicator.ends_with('|') || indicator.ends_with('>') {
                block_scalar = Some(indent);
            }
        }
    }
    None
}

impl ParsedFile {
    /// Reads `file`; parses it unless its text is what `previous` was parsed from, which it
    /// then takes. On failure `previous` is left as it was. Files too large or too deep are
    /// refused before parsing, so that one file cannot keep the loader busy.
    fn refresh(file: &Path, previous: &mut Option<ParsedFile>) -> Result<Self, ManifestError> {
        let text = read_bounded(file, MAX_FILE_BYTES)?;
        let digest = digest(&text);
        if previous.as_ref().is_some_and(|p| p.digest == digest) {
            return Ok(previous.take().expect("checked"));
        }
        if let Some(line) = nesting_depth(&text, MAX_DEPTH) {
            return Err(ManifestError::TooDeep {
                file: file.to_owned(),
                line,
                limit: MAX_DEPTH,
            });
        }
        let mut parsed = Self::parse(file, &text, digest)?;
        if let Some(previous) = previous.take() {
            parsed.keep_unchanged(&previous);
        }
        Ok(parsed)
    }

    /// Objects equal to their previous parse keep its `Arc`, so the agent sees by identity
    /// which objects of an edited file really changed.
    fn keep_unchanged(&mut self, previous: &ParsedFile) {
        let mut services = HashMap::new();
        let mut slices = HashMap::new();
        let mut nodes = HashMap::new();
        for object in &previous.objects {
            match object {
                ParsedObject::Service(_, key, service) => {
                    services.insert(key, service);
                }
                ParsedObject::EndpointSlice(_, key, slice) => {
                    slices.insert(key, slice);
                }
                ParsedObject::Node(_, key, node) => {
                    nodes.insert(key, node);
                }
            }
        }
        for object in &mut self.objects {
            match object {
                ParsedObject::Service(_, key, service) => keep(&services, key, service),
                ParsedObject::EndpointSlice(_, key, slice) => keep(&slices, key, slice),
                ParsedObject::Node(_, key, node) => keep(&nodes, key, node),
            }
        }
        fn keep<T: PartialEq>(previous: &HashMap<&Key, &Arc<T>>, key: &Key, object: &mut Arc<T>) {
            if let Some(old) = previous.get(key)
                && ***old == **object
            {
                *object = Arc::clone(old);
            }
        }
    }

    fn parse(file: &Path, text: &str, digest: TextDigest) -> Result<Self, ManifestError> {
        let mut objects = Vec::new();
        for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            let origin = Origin {
                file: file.to_owned(),
                document: index + 1,
            };
            // A failed parse ends the stream (the deserializer would repeat the error forever).
            let value: Value =
                serde::Deserialize::deserialize(document).map_err(|err| ManifestError::Syntax {
                    origin: origin.clone(),
                    message: err.to_string(),
                })?;
            parse_document(origin, value, &mut objects)?;
        }
        objects.shrink_to_fit();
        Ok(Self { digest, objects })
    }
}

fn parse_document(
    origin: Origin,
    value: Value,
    objects: &mut Vec<ParsedObject>,
) -> Result<(), ManifestError> {
    if value.is_null() {
        return Ok(()); // empty document, or only comments
    }
    let location = ObjectLocation {
        origin,
        list_item: None,
        object: None,
    };
    // `kubectl get -o yaml` writes `kind: List`; the raw API writes `ServiceList` etc.
    let (_, kind) = type_meta(&value, &location)?;
    if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
        return parse_list(location, value, objects);
    }
    objects.extend(parse_object(location, value)?);
    Ok(())
}

fn parse_list(
    location: ObjectLocation,
    mut list: Value,
    objects: &mut Vec<ParsedObject>,
) -> Result<(), ManifestError> {
    let items = match list.get_mut("items").map(Value::take) {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ManifestError::InvalidField {
                location,
                path: "items".to_owned(),
                message: format!(
                    "expected a sequence of objects, found {}",
                    json_type(&other)
                ),
            });
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        let location = ObjectLocation {
            list_item: Some(index),
            ..location.clone()
        };
        objects.extend(parse_object(location, item)?);
    }
    Ok(())
}

/// A Service, an EndpointSlice or a Node; `None` for the kinds the agent does not read.
fn parse_object(
    mut location: ObjectLocation,
    value: Value,
) -> Result<Option<ParsedObject>, ManifestError> {
    match type_meta(&value, &location)? {
        ("v1", "Service") => {
            location.object = Some(describe_object("Service", &value));
            let mut service: Service = deserialize(&location, value)?;
            let key = identity(&location, &mut service.metadata)?;
            validate_service(&service, &location)?;
            Ok(Some(ParsedObject::Service(
                location,
                key,
                Arc::new(service),
            )))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            location.object = Some(describe_object("EndpointSlice", &value));
            let mut slice: EndpointSlice = deserialize(&location, value)?;
            let key = identity(&location, &mut slice.metadata)?;
            Ok(Some(ParsedObject::EndpointSlice(
                location,
                key,
                Arc::new(slice),
            )))
        }
        ("v1", "Node") => {
            location.object = Some(describe_object("Node", &value));
            let mut node: Node = deserialize(&location, value)?;
            let key = identity(&location, &mut node.metadata)?;
            // Cluster-scoped: a namespace written on a Node means nothing.
            node.metadata.namespace = None;
            Ok(Some(ParsedObject::Node(
                location,
                (String::new(), key.1),
                Arc::new(node),
            )))
        }
        // Other kinds, and other groups' "Service" (Knative's serving.knative.dev/v1).
        (api_version, kind) => {
            tracing::debug!(%location, api_version, kind, "skipping object of another kind");
            Ok(None)
        }
    }
}

/// `apiVersion` and `kind` of a document, which every Kubernetes object must have.
fn type_meta<'a>(
    value: &'a Value,
    location: &ObjectLocation,
) -> Result<(&'a str, &'a str), ManifestError> {
    let not_an_object = |reason: String| ManifestError::NotAnObject {
        location: location.clone(),
        reason,
    };
    let Value::Object(map) = value else {
        return Err(not_an_object(format!(
            "expected a mapping, found {}",
            json_type(value)
        )));
    };
    let field = |name: &str| match map.get(name) {
        Some(Value::String(text)) if !text.is_empty() => Ok(text.as_str()),
        Some(Value::String(_)) | None => Err(not_an_object(format!("{name} is missing"))),
        Some(other) => Err(not_an_object(format!(
            "{name} must be a string, found {}",
            json_type(other)
        ))),
    };
    Ok((field("apiVersion")?, field("kind")?))
}

/// `Service default/web` from the raw document, for error messages written before the typed
/// object exists.
fn describe_object(kind: &str, value: &Value) -> String {
    let metadata = value.get("metadata");
    let text = |field: &str| metadata.and_then(|m| m.get(field)).and_then(Value::as_str);
    match text("name") {
        // Cluster-scoped.
        Some(name) if kind == "Node" => format!("{kind} {name}"),
        Some(name) => format!("{kind} {}/{name}", text("namespace").unwrap_or("default")),
        None => kind.to_owned(),
    }
}

fn deserialize<T: DeserializeOwned>(
    location: &ObjectLocation,
    value: Value,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let message = err.into_inner().to_string();
        ManifestError::InvalidField {
            location: location.clone(),
            // serde_path_to_error writes "." for the object itself.
            path: if path == "." {
                "(object)".to_owned()
            } else {
                path
            },
            message,
        }
    })
}

/// Checks metadata.name and defaults metadata.namespace; returns (namespace, name).
fn identity(
    location: &ObjectLocation,
    metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(String, String), ManifestError> {
    let Some(name) = metadata.name.clone().filter(|name| !name.is_empty()) else {
        return Err(ManifestError::InvalidField {
            location: location.clone(),
            path: "metadata.name".to_owned(),
            message: "required (generateName alone is not supported in manifest files)".to_owned(),
        });
    };
    let namespace = metadata
        .namespace
        .get_or_insert_with(|| "default".to_owned());
    if namespace.is_empty() {
        *namespace = "default".to_owned();
    }
    Ok((namespace.clone(), name))
}

/// What the API server would reject and the agent relies on: known protocols and node ports
/// that are port numbers (0 means "not set", as in the API).
fn validate_service(service: &Service, location: &ObjectLocation) -> Result<(), ManifestError> {
    let invalid = |path: String, message: String| ManifestError::InvalidField {
        location: location.clone(),
        path,
        message,
    };
    let Some(spec) = &service.spec else {
        return Ok(());
    };
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        if let Some(protocol) = &port.protocol
            && !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP")
        {
            return Err(invalid(
                format!("spec.ports[{index}].protocol"),
                format!("unsupported value {protocol:?}: expected \"TCP\", \"UDP\" or \"SCTP\""),
            ));
        }
        if let Some(node_port) = port.node_port
            && !(0..=65535).contains(&node_port)
        {
            return Err(invalid(
                format!("spec.ports[{index}].nodePort"),
                format!("{node_port} is not a port number (1-65535, or 0 to have one allocated)"),
            ));
        }
    }
    if let Some(port) = spec.health_check_node_port
        && !(0..=65535).contains(&port)
    {
        return Err(invalid(
            "spec.healthCheckNodePort".to_owned(),
            format!("{port} is not a port number (1-65535, or 0 to have one allocated)"),
        ));
    }
    // The families decide which frontends a Service gets (`desired::service_families`).
    let families = spec.ip_families.as_deref().unwrap_or_default();
    for (index, family) in families.iter().enumerate() {
        if !matches!(family.as_str(), "IPv4" | "IPv6") {
            return Err(invalid(
                format!("spec.ipFamilies[{index}]"),
                format!("unsupported value {family:?}: expected \"IPv4\" or \"IPv6\""),
            ));
        }
        if families[..index].contains(family) {
            return Err(invalid(
                format!("spec.ipFamilies[{index}]"),
                format!("{family} is listed twice"),
            ));
        }
    }
    if let Some(policy) = &spec.ip_family_policy {
        match policy.as_str() {
            "PreferDualStack" | "RequireDualStack" => {}
            "SingleStack" if families.len() > 1 => {
                return Err(invalid(
                    "spec.ipFamilyPolicy".to_owned(),
                    "SingleStack with two spec.ipFamilies: one family, or PreferDualStack or \
                     RequireDualStack"
                        .to_owned(),
                ));
            }
            "SingleStack" => {}
            _ => {
                return Err(invalid(
                    "spec.ipFamilyPolicy".to_owned(),
                    format!(
                        "unsupported value {policy:?}: expected \"SingleStack\", \
                         \"PreferDualStack\" or \"RequireDualStack\""
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::ScratchDir;

    impl ScratchDir {
        fn load(&self) -> Result<Manifests, ManifestError> {
            load_dir(self.path())
        }

        fn load_err(&self) -> String {
            let err = self.load().expect_err("loading should fail").to_string();
            // Paths are shown as found; strip the scratch prefix for readable assertions.
            err.replace(&format!("{}/", self.path().display()), "")
        }
    }

    fn names(manifests: &Manifests) -> Vec<String> {
        manifests
            .services
            .iter()
            .map(|(origin, svc)| {
                format!(
                    "{}#{} {}/{}",
                    origin.file.file_name().unwrap().to_string_lossy(),
                    origin.document,
                    svc.metadata.namespace.as_deref().unwrap(),
                    svc.metadata.name.as_deref().unwrap()
                )
            })
            .collect()
    }

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 30080\n";

    #[test]
    fn loads_multi_document_files_in_name_order_and_defaults_the_namespace() {
        let dir = ScratchDir::new("multi");
        dir.write(
            "b.yaml",
            "---\n# only a comment\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: shop\n---\n---\n",
        )
        .write("a.yml", WEB)
        .write("sub/c.json", r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"}}"#)
        .write("notes.txt", "not a manifest")
        .write(".hidden.yaml", "kind: [broken");
        let manifests = dir.load().unwrap();
        assert_eq!(
            names(&manifests),
            [
                "a.yml#1 default/web",
                "b.yaml#2 shop/api",
                "c.json#1 default/db"
            ]
        );
        let web = &manifests.services[0].1;
        let port = &web.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(port.node_port, Some(30080));
    }

    /// Issue #16: a 200 kB file nested 100,000 deep kept the loader busy for 25 s. Files too
    /// deep or too large are refused before parsing, naming the file and line.
    #[test]
    fn files_too_deep_or_too_large_are_refused_before_parsing() {
        let dir = ScratchDir::new("bounds");
        dir.write("web.yaml", WEB);
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        dir.write("deep.yaml", &deep);
        assert_eq!(
            dir.load_err(),
            format!(
                "deep.yaml:1: nested more than {MAX_DEPTH} levels deep (brackets, braces, indentation); not parsed"
            )
        );
        // Braces over many lines, as JSON would be.
        let json = "{\"a\":\n".repeat(200) + "1" + &"}".repeat(200);
        dir.write("deep.yaml", &json);
        // The top level counts as one.
        assert!(
            dir.load_err()
                .starts_with(&format!("deep.yaml:{MAX_DEPTH}:")),
            "{}",
            dir.load_err()
        );
        // Block nesting, by indentation.
        let block: String = (0..100)
            .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
            .collect();
        dir.write("deep.yaml", &block);
        assert!(dir.load_err().contains("levels deep"));
        let dashes = "- ".repeat(100) + "x\n";
        dir.write("deep.yaml", &dashes);
        assert!(dir.load_err().contains("levels deep"));

        // Large, checked on its size before it is read (a sparse file: nothing written).
        std::fs::remove_file(dir.path().join("deep.yaml")).unwrap();
        let big = std::fs::File::create(dir.path().join("big.yaml")).unwrap();
        big.set_len(MAX_FILE_BYTES + 1).unwrap();
        assert!(
            dir.load_err().starts_with(&format!(
                "big.yaml: {} bytes, more than",
                MAX_FILE_BYTES + 1
            )),
            "{}",
            dir.load_err()
        );
        std::fs::remove_file(dir.path().join("big.yaml")).unwrap();
        assert_eq!(names(&dir.load().unwrap()), ["web.yaml#1 default/web"]);
    }

    #[test]
    fn the_depth_scan_ignores_quoted_text_comments_and_block_scalars() {
        let brackets = "[".repeat(200);
        let fine = [
            format!("a: \"{brackets}\"\n"),
            format!("a: '{brackets}'\n"),
            format!("a: 'it''s {brackets}'\n"),
            format!("a: \"say \\\"{brackets}\"\n"),
            format!("a: 1 # {brackets}\n"),
            format!("# {brackets}\n"),
            // A block scalar's text may be indented any way.
            (0..100).fold("script: |\n".to_owned(), |t, i| {
                t + &" ".repeat(2 + i) + "x\n"
            }) + "b: 2\n",
            // A quote inside a plain scalar opens nothing.
            format!("a: it's\nb: {}\n", "[".repeat(10) + &"]".repeat(10)),
        ];
        for text in &fine {
            assert_eq!(nesting_depth(text, MAX_DEPTH), None, "{text}");
        }
        // A plain scalar's quote must not hide what follows.
        let hidden = format!("a: it's\nb: {brackets}\n");
        assert_eq!(nesting_depth(&hidden, MAX_DEPTH), Some(2));
        // Every manifest of the examples is far below the limit.
        assert_eq!(nesting_depth(WEB, 8), None);
    }

    #[test]
    fn a_file_above_the_size_limit_is_refused_unread_with_its_name_and_the_limit() {
        let dir = ScratchDir::new("too-large");
        let mut text = String::from(WEB);
        text.push('#');
        text.push_str(&"x".repeat(MAX_FILE_BYTES as usize + 1 - text.len()));
        assert_eq!(text.len() as u64, MAX_FILE_BYTES + 1);
        dir.write("a.yaml", WEB).write("huge.yaml", &text);
        assert_eq!(
            dir.load_err(),
            "huge.yaml: 16777217 bytes, more than the 16 MiB a manifest file may hold; split it \
             into several files"
        );
    }

    #[test]
    fn the_size_limit_is_inclusive() {
        let dir = ScratchDir::new("size-limit");
        dir.write("web.yaml", WEB);
        let file = dir.path().join("web.yaml");
        let len = WEB.len() as u64;
        assert_eq!(read_bounded(&file, len).unwrap(), WEB);
        assert!(matches!(
            read_bounded(&file, len - 1),
            Err(ManifestError::TooLarge { size, limit, .. }) if size == len && limit == len - 1
        ));
    }

    #[test]
    fn reads_a_mounted_config_map_once() {
        // The kubelet's layout: files are symlinks into `..data`, itself a symlink to a
        // timestamped directory.
        let dir = ScratchDir::new("configmap");
        dir.write("..2024_01_01_00_00_00.000/web.yaml", WEB);
        let link = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, dir.path().join(name)).unwrap()
        };
        link("..2024_01_01_00_00_00.000", "..data");
        link("..data/web.yaml", "web.yaml");
        link("..data", "linked-dir");
        let manifests = dir.load().unwrap();
        assert_eq!(names(&manifests), ["web.yaml#1 default/web"]);
    }

    #[test]
    fn loads_list_items_and_endpoint_slices_and_skips_other_kinds() {
        let dir = ScratchDir::new("list");
        dir.write(
            "all.yaml",
            r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: one}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: one}
  spec: {replicas: "not checked: other kinds are skipped"}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: one-abc, labels: {kubernetes.io/service-name: one}}
  addressType: IPv4
  endpoints: [{addresses: [10.0.0.1]}]
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative-is-not-core}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm}
"#,
        );
        let manifests = dir.load().unwrap();
        assert_eq!(names(&manifests), ["all.yaml#1 default/one"]);
        assert_eq!(manifests.endpoint_slices.len(), 1);
        let (origin, slice) = &manifests.endpoint_slices[0];
        assert_eq!(origin.document, 1);
        assert_eq!(slice.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(slice.endpoints.as_ref().unwrap()[0].addresses, ["10.0.0.1"]);
    }

    /// Nodes are read (the files source takes the zone of the agent's own), cluster-scoped:
    /// no namespace, and one name once whatever namespace a file writes.
    #[test]
    fn nodes_are_kept_without_a_namespace() {
        let node = |name: &str, extra: &str| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{extra}  labels: {{topology.kubernetes.io/zone: zone-a}}\n"
            )
        };
        let dir = ScratchDir::new("nodes");
        dir.write(
            "nodes.yaml",
            &format!(
                "{WEB}---\n{}---\n{}",
                node("node-a", ""),
                node("node-b", "")
            ),
        );
        let manifests = dir.load().unwrap();
        assert_eq!(manifests.services.len(), 1);
        let nodes: Vec<(usize, Option<&str>, Option<&str>)> = manifests
            .nodes
            .iter()
            .map(|(origin, n)| {
                (
                    origin.document,
                    n.metadata.name.as_deref(),
                    n.metadata.namespace.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            nodes,
            [(2, Some("node-a"), None), (3, Some("node-b"), None)]
        );
        assert_eq!(
            manifests.nodes[0].1.metadata.labels.as_ref().unwrap()["topology.kubernetes.io/zone"],
            "zone-a"
        );

        let dir = ScratchDir::new("nodes-dup");
        dir.write("a.yaml", &node("node-a", "  namespace: x\n"))
            .write("b.yaml", &node("node-a", ""));
        assert_eq!(
            dir.load_err(),
            "b.yaml: document 1 (Node node-a): defined twice, first at a.yaml: document 1"
        );
        let dir = ScratchDir::new("nodes-bad");
        dir.write(
            "a.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: [zone-a]}\n",
        );
        let err = dir.load_err();
        assert!(
            err.starts_with("a.yaml: document 1 (Node node-a): metadata.labels: "),
            "{err}"
        );
    }

    #[test]
    fn wrong_field_type_names_file_document_object_and_field_path() {
        let dir = ScratchDir::new("badtype");
        dir.write("web.yaml", &format!(
            "{WEB}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web2\n  namespace: shop\nspec:\n  ports:\n  - port: 80\n    nodePort: abc\n"
        ));
        assert_eq!(
            dir.load_err(),
            "web.yaml: document 2 (Service shop/web2): spec.ports[0].nodePort: invalid type: \
             string \"abc\", expected i32"
        );
    }

    #[test]
    fn errors_inside_a_list_name_the_item() {
        let dir = ScratchDir::new("listerr");
        dir.write(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: ok}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: bad}\n  spec: {ports: [{port: 80, protocol: ICMP}]}\n",
        );
        assert_eq!(
            dir.load_err(),
            "list.yaml: document 1, items[1] (Service default/bad): spec.ports[0].protocol: \
             unsupported value \"ICMP\": expected \"TCP\", \"UDP\" or \"SCTP\""
        );
    }

    #[test]
    fn rejects_what_the_api_server_would() {
        let cases = [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n",
                "a.yaml: document 1 (Service): metadata.name: required (generateName alone is \
                 not supported in manifest files)",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: big}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 70000}]}\n",
                "a.yaml: document 1 (Service default/big): spec.ports[0].nodePort: 70000 is not a \
                 port number (1-65535, or 0 to have one allocated)",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: neg}\nspec: {type: LoadBalancer, healthCheckNodePort: -1}\n",
                "a.yaml: document 1 (Service default/neg): spec.healthCheckNodePort: -1 is not a \
                 port number (1-65535, or 0 to have one allocated)",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: fam}\nspec: {ipFamilies: [IPv4, IPv5]}\n",
                "a.yaml: document 1 (Service default/fam): spec.ipFamilies[1]: unsupported value \
                 \"IPv5\": expected \"IPv4\" or \"IPv6\"",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: twice}\nspec: {ipFamilies: [IPv6, IPv6]}\n",
                "a.yaml: document 1 (Service default/twice): spec.ipFamilies[1]: IPv6 is listed \
                 twice",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: single}\nspec: {ipFamilyPolicy: SingleStack, ipFamilies: [IPv4, IPv6]}\n",
                "a.yaml: document 1 (Service default/single): spec.ipFamilyPolicy: SingleStack \
                 with two spec.ipFamilies: one family, or PreferDualStack or RequireDualStack",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: pol}\nspec: {ipFamilyPolicy: DualStack}\n",
                "a.yaml: document 1 (Service default/pol): spec.ipFamilyPolicy: unsupported value \
                 \"DualStack\": expected \"SingleStack\", \"PreferDualStack\" or \
                 \"RequireDualStack\"",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: {port: 80}}\n",
                "a.yaml: document 1 (Service default/x): spec.ports: invalid type: map, expected \
                 a sequence",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: [oops]\n",
                "a.yaml: document 1 (Service): metadata.name: invalid type: sequence, expected a \
                 string",
            ),
            (
                "- just\n- a list\n",
                "a.yaml: document 1: not a Kubernetes object: expected a mapping, found a sequence",
            ),
            (
                "apiVersion: v1\nknd: Service\nmetadata: {name: typo}\n",
                "a.yaml: document 1: not a Kubernetes object: kind is missing",
            ),
            (
                "apiVersion: v1\nkind: List\nitems: {a: b}\n",
                "a.yaml: document 1: items: expected a sequence of objects, found a mapping",
            ),
        ];
        for (index, (text, expected)) in cases.into_iter().enumerate() {
            let dir = ScratchDir::new(&format!("reject{index}"));
            dir.write("a.yaml", text);
            assert_eq!(dir.load_err(), expected, "case {index}");
        }
    }

    #[test]
    fn yaml_syntax_errors_name_the_file_and_document() {
        let dir = ScratchDir::new("syntax");
        dir.write("bad.yaml", &format!("{WEB}---\nkind: [unclosed\n"));
        let err = dir.load_err();
        assert!(err.starts_with("bad.yaml: document 2: "), "{err}");
        assert!(err.contains("line"), "the YAML position is kept: {err}");
    }

    #[test]
    fn duplicate_objects_name_both_origins() {
        let dir = ScratchDir::new("dup");
        dir.write("a.yaml", WEB).write(
            "b.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n",
        );
        assert_eq!(
            dir.load_err(),
            "b.yaml: document 2 (Service default/web): defined twice, first at a.yaml: document 1"
        );
        // The same name in another namespace, or of another kind, is a different object.
        let dir = ScratchDir::new("nodup");
        dir.write("a.yaml", WEB).write(
            "b.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: other}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web}\naddressType: IPv4\nendpoints: []\n",
        );
        assert_eq!(dir.load().unwrap().services.len(), 2);
    }

    #[test]
    fn a_reload_parses_only_changed_files_and_survives_a_bad_one() {
        let dir = ScratchDir::new("manifests-cache");
        let service = |name: &str, port: u16| {
            format!(
                "kind: Service\napiVersion: v1\nmetadata: {{ name: {name} }}\nspec: {{ type: NodePort, ports: [ {{ port: 80, nodePort: {port} }} ] }}\n"
            )
        };
        dir.write("a.yaml", &service("a", 30001))
            .write("b.yaml", &service("b", 30002));
        let mut cache = ParseCache::default();
        let first = load_dir_cached(dir.path(), &mut cache).unwrap();
        assert_eq!(cache.len(), 2);

        dir.write("b.yaml", &service("b", 30003));
        let second = load_dir_cached(dir.path(), &mut cache).unwrap();
        assert!(
            Arc::ptr_eq(&first.services[0].1, &second.services[0].1),
            "a.yaml was not parsed again"
        );
        assert!(!Arc::ptr_eq(&first.services[1].1, &second.services[1].1));
        let port = |m: &Manifests| {
            m.services[1]
                .1
                .spec
                .as_ref()
                .unwrap()
                .ports
                .as_ref()
                .unwrap()[0]
                .node_port
        };
        assert_eq!(port(&second), Some(30003));

        // A bad file fails the load; the good files' parses stay for the next one.
        dir.write(
            "c.yaml",
            "kind: Service\napiVersion: v1\nmetadata: { namespace: x }\n",
        );
        assert!(load_dir_cached(dir.path(), &mut cache).is_err());
        dir.write("c.yaml", "");
        let third = load_dir_cached(dir.path(), &mut cache).unwrap();
        assert!(Arc::ptr_eq(&second.services[0].1, &third.services[0].1));
        assert!(Arc::ptr_eq(&second.services[1].1, &third.services[1].1));

        // In an edited file, the objects that did not change keep their Arc too.
        dir.write(
            "c.yaml",
            &format!("{}---\n{}", service("c", 30005), service("e", 30006)),
        );
        let fourth = load_dir_cached(dir.path(), &mut cache).unwrap();
        dir.write(
            "c.yaml",
            &format!("{}---\n{}", service("c", 30005), service("e", 30007)),
        );
        let fifth = load_dir_cached(dir.path(), &mut cache).unwrap();
        assert!(
            Arc::ptr_eq(&fourth.services[2].1, &fifth.services[2].1),
            "c unchanged"
        );
        assert!(
            !Arc::ptr_eq(&fourth.services[3].1, &fifth.services[3].1),
            "e edited"
        );
        std::fs::remove_file(dir.path().join("c.yaml")).unwrap();

        // The cache follows the directory: a removed file is forgotten, and a file defining
        // what another one already defines is still refused.
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(
            load_dir_cached(dir.path(), &mut cache)
                .unwrap()
                .services
                .len(),
            1
        );
        assert_eq!(cache.len(), 1, "b.yaml only");
        dir.write("d.yaml", &service("b", 30004));
        let err = load_dir_cached(dir.path(), &mut cache).unwrap_err();
        assert!(matches!(err, ManifestError::Duplicate { .. }), "{err}");
    }

    #[test]
    fn unreadable_directory_is_an_error_naming_it() {
        let err = load_dir(Path::new("/nonexistent/manifests"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nonexistent/manifests: cannot read the manifests directory: "),
            "{err}"
        );
    }
}
