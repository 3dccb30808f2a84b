//! The compile run: parse every document, merge the sections (each may be defined in one file
//! only), compile each section, hash the content, and refuse the whole policy on any error.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use super::bounds::{MAX_CLAIMS_BYTES, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES};
use crate::policy::compiled::Policy;
use crate::policy::error::{At, ErrorSink, PolicyError, PolicyErrors, yaml_message};
use crate::policy::expr::eval;
use crate::policy::expr::vars::InputSizes;
use crate::policy::model::{AuthSection, ConnectionsSection, Located, MessagesSection, OriginsSection, PolicyDocument};
use crate::policy::source::PolicySource;

/// Stack for the compiling thread: CEL parsing recurses with the expression's nesting, and an
/// expression within the length bound may nest a few thousand levels before it is refused.
const COMPILE_STACK_BYTES: usize = 256 * 1024 * 1024;

/// What compiling needs from outside the policy directory.
pub struct CompileOptions<'a> {
    /// The generation the new policy gets.
    pub generation: u64,
    /// Reads an environment variable holding a key (`auth.jwt.secret_env`).
    pub secret_lookup: &'a (dyn Fn(&str) -> Option<String> + Sync),
}

/// Reads the process environment: what `policy check`, `policy test` and `serve` use.
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Reads and compiles a policy directory.
pub fn compile_dir(dir: &Path, options: &CompileOptions<'_>) -> Result<Policy, PolicyErrors> {
    compile(&PolicySource::read_dir(dir)?, options)
}

/// Compiles a policy read into memory. Runs on its own thread with a large stack so that no
/// expression can overflow it; a panic there (a bug) refuses the policy instead of crashing.
pub fn compile(source: &PolicySource, options: &CompileOptions<'_>) -> Result<Policy, PolicyErrors> {
    let outcome = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("policy-compile".into())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn_scoped(scope, || Compiler::new(source, options).run())
            .map(|handle| handle.join())
    });
    let internal = |message: String| {
        PolicyErrors(vec![PolicyError {
            file: source.dir.display().to_string(),
            line: 0,
            col: 0,
            path: String::new(),
            message,
        }])
    };
    match outcome {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(internal("internal error while compiling the policy (this is a wsgate bug)".into())),
        Err(e) => Err(internal(format!("cannot start the policy compiler: {e}"))),
    }
}

/// A section and the file it came from.
struct Section<'a, T> {
    file: &'a str,
    value: Option<&'a Located<T>>,
}

impl<'a, T> Section<'a, T> {
    fn absent(file: &'a str) -> Self {
        Section { file, value: None }
    }
}

/// One compile run's state; each section's compiling is a method of it, in the file of its
/// section.
pub(crate) struct Compiler<'a> {
    pub(super) source: &'a PolicySource,
    pub(super) options: &'a CompileOptions<'a>,
    pub(super) errors: ErrorSink,
    /// Key files read, for the content hash.
    pub(super) key_files: Vec<(String, Vec<u8>)>,
    pub(super) sizes: InputSizes,
    /// The CEL environment of the policy being built (constant limits are evaluated in it).
    pub(super) cel_env: Arc<cel::Env>,
}

impl<'a> Compiler<'a> {
    fn new(source: &'a PolicySource, options: &'a CompileOptions<'a>) -> Self {
        Compiler {
            source,
            options,
            errors: ErrorSink::default(),
            key_files: Vec::new(),
            cel_env: Arc::new(eval::env()),
            sizes: InputSizes {
                claims: MAX_CLAIMS_BYTES,
                request: MAX_REQUEST_BYTES,
                conn: 1024,
                message: MAX_MESSAGE_BYTES,
            },
        }
    }

    fn run(mut self) -> Result<Policy, PolicyErrors> {
        let documents = self.parse_documents();
        let first = self.source.documents.first().map_or("policy.yaml", |d| d.name.as_str());
        let mut auth = Section::absent(first);
        let mut origins = Section::absent(first);
        let mut connections = Section::absent(first);
        let mut messages = Section::absent(first);
        for (file, doc) in &documents {
            self.merge(&mut auth, file, doc.auth.as_ref(), "auth");
            self.merge(&mut origins, file, doc.origins.as_ref(), "origins");
            self.merge(&mut connections, file, doc.connections.as_ref(), "connections");
            self.merge(&mut messages, file, doc.messages.as_ref(), "messages");
        }
        let (default_auth, default_origins, default_connections, default_messages) = (
            AuthSection::default(),
            OriginsSection::default(),
            ConnectionsSection::default(),
            MessagesSection::default(),
        );
        let auth_v = auth.value.map_or(&default_auth, |l| &l.value);
        let origins_v = origins.value.map_or(&default_origins, |l| &l.value);
        let connections_v = connections.value.map_or(&default_connections, |l| &l.value);
        let messages_v = messages.value.map_or(&default_messages, |l| &l.value);

        let schemas = self.compile_schemas();
        // Message sizes bound the cost of message rules, so the limits come first.
        let message_policy = self.messages(messages.file, messages_v, &schemas);
        let auth_policy = self.auth(auth.file, auth_v);
        let origin_policy = self.origins(origins.file, origins_v);
        self.cookies_need_listed_origins(auth.file, auth_v, origins.file, origins_v);
        let connection_policy = self.connections(connections.file, connections_v);

        let content_hash = self.content_hash();
        let (Some(auth), Some(origins), Some(connections), Some(messages)) =
            (auth_policy, origin_policy, connection_policy, message_policy)
        else {
            // Every section that failed recorded why; the check guards against one that didn't.
            if self.errors.is_empty() {
                self.errors.push(
                    &At::in_file(first, 0, 0),
                    "the policy did not compile (no error was recorded: a wsgate bug)",
                );
            }
            return Err(self.errors.finish().expect_err("errors were recorded"));
        };
        self.errors.finish()?;
        Ok(Policy {
            generation: self.options.generation,
            content_hash,
            sources: self
                .source
                .documents
                .iter()
                .chain(&self.source.schemas)
                .map(|f| f.name.clone())
                .chain(self.key_files.iter().map(|(name, _)| name.clone()))
                .collect(),
            loaded_at: SystemTime::now(),
            auth,
            origins,
            connections,
            messages,
            cel_env: self.cel_env.clone(),
        })
    }

    fn parse_documents(&mut self) -> Vec<(&'a str, PolicyDocument)> {
        let mut documents = Vec::new();
        for file in &self.source.documents {
            match serde_saphyr::from_str::<PolicyDocument>(&file.text) {
                Ok(doc) => {
                    if doc.version.value != 1 {
                        self.errors.push(
                            &At::of(&file.name, "version", &doc.version),
                            "unsupported policy format version; this wsgate reads version 1",
                        );
                    }
                    documents.push((file.name.as_str(), doc));
                }
                Err(e) => {
                    let (line, col) = e.location().map_or((0, 0), |l| (l.line() as usize, l.column() as usize));
                    self.errors.push(&At::in_file(&file.name, line, col), yaml_message(&e));
                }
            }
        }
        documents
    }

    fn merge<'d, T>(&mut self, slot: &mut Section<'d, T>, file: &'d str, value: Option<&'d Located<T>>, name: &str) {
        let Some(value) = value else { return };
        if let Some(existing) = slot.value {
            self.errors.push(
                &At::of(file, name, value),
                format!(
                    "section `{name}` is already defined in {}:{}; a section may be defined in one file only",
                    slot.file, existing.line
                ),
            );
            return;
        }
        *slot = Section { file, value: Some(value) };
    }

    fn content_hash(&self) -> String {
        let mut hasher = Sha256::new();
        let files =
            self.source.documents.iter().chain(&self.source.schemas).map(|f| (f.name.as_str(), f.text.as_bytes()));
        let keys = self.key_files.iter().map(|(n, b)| (n.as_str(), b.as_slice()));
        let mut all: Vec<(&str, &[u8])> = files.chain(keys).collect();
        all.sort();
        for (name, bytes) in all {
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}
