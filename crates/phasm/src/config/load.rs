//! Reading a machine file and everything it imports, then building and checking the model.
//!
//! Loading runs in two passes. The first reads and parses files, following `import:` entries
//! (resolved from the importing file's folder, then each ancestor folder) and catching missing
//! files and cycles. The second walks the parsed files in import order and builds the model,
//! so machines keep the order in which they appear, imported ones where their import stood.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::build::{self, MachineSpans};
use super::read::{suggest, Cx};
use super::source::{SourceFile, Sources};
use super::yaml::{self, Node, NodeKind, Pos, Span};
use super::{LoadOptions, Loaded, Sites};
use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::machine::{
    ActionBinding, Config, ExecBinding, HttpBinding, LinesBinding, ListBinding, PythonSettings,
    QueueLimits, Rate, DEFAULT_QUEUE,
};

/// Keys of a file's top level.
const TOP_KEYS: &[&str] = &[
    "state_machines",
    "root_url",
    "enable_capabilities_check",
    "actions",
    "queues",
    "python",
    "schedules",
];

/// Load a file from disk, with its imports.
pub(crate) fn load_file(path: &Path, options: &LoadOptions) -> Result<Loaded, Diagnostics> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Diagnostics(vec![Diagnostic::error(format!(
            "cannot read `{}`: {e}",
            path.display()
        ))
        .with_label(
            "check the path, or run the command from the folder that holds the file",
        )])
    })?;
    load_text(&text, path, options)
}

/// Load a file's text as if it were at `path` (imports and `exec` folders resolve from there).
pub(crate) fn load_text(
    text: &str,
    path: &Path,
    options: &LoadOptions,
) -> Result<Loaded, Diagnostics> {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| absolute(path));
    let mut reader = Reader::default();
    let root = reader.add(SourceFile {
        display: path.display().to_string(),
        path: canonical,
        text: text.to_string(),
    });
    reader.follow(root, &mut vec![root]);

    let Reader {
        sources,
        roots,
        imports,
        broken,
        diags: read_diags,
        ..
    } = reader;
    let mut cx = Cx::new(&sources);
    cx.diags = read_diags;
    let mut asm = Assembler {
        roots: &roots,
        broken: &broken,
        imports: &imports,
        visited: HashSet::new(),
        config: Config::default(),
        spans: Vec::new(),
        action_spans: HashMap::new(),
        queue_spans: HashMap::new(),
        python_span: None,
        schedule_spans: Vec::new(),
    };
    asm.file(&mut cx, root, false);
    asm.finish(&mut cx, options);
    let sites = asm.sites(&cx);
    let mut diags = cx.diags;
    diags.sort_by(|a, b| {
        let key = |d: &Diagnostic| {
            d.location
                .as_ref()
                .map(|l| (l.file.clone(), l.line, l.column))
        };
        key(a).cmp(&key(b))
    });
    let diags = Diagnostics(diags);
    if diags.has_errors() {
        return Err(diags);
    }
    Ok(Loaded {
        config: asm.config,
        warnings: diags.0,
        sites,
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Pass one: read and parse files, following imports.
#[derive(Default)]
struct Reader {
    sources: Sources,
    roots: Vec<Option<Node>>,
    /// (importing file, index in its `state_machines`) → imported file.
    imports: HashMap<(usize, usize), usize>,
    by_path: HashMap<PathBuf, usize>,
    /// Files that are not YAML (already reported).
    broken: HashSet<usize>,
    diags: Vec<Diagnostic>,
}

impl Reader {
    fn add(&mut self, file: SourceFile) -> usize {
        let path = file.path.clone();
        let index = self.sources.add(file);
        self.by_path.insert(path, index);
        self.roots.push(None);
        index
    }

    fn follow(&mut self, file: usize, chain: &mut Vec<usize>) {
        let root = match yaml::parse(&self.sources.files[file].text, file) {
            Ok(root) => root,
            Err(e) => {
                let loc = self.sources.location_at(file, e.pos, 1);
                self.diags
                    .push(Diagnostic::error(format!("malformed YAML: {}", e.message)).at(loc));
                self.broken.insert(file);
                return;
            }
        };
        let entries = root
            .as_ref()
            .and_then(state_machine_items)
            .unwrap_or_default();
        for (i, item) in entries.iter().enumerate() {
            let Some(value) = import_value(item) else {
                continue;
            };
            let Some(name) = value.scalar().filter(|_| !value.is_null()) else {
                continue; // reported by pass two
            };
            self.import(file, i, name, value.span, chain);
        }
        self.roots[file] = root;
    }

    fn import(&mut self, file: usize, item: usize, name: &str, span: Span, chain: &mut Vec<usize>) {
        let importer = self.sources.files[file].path.clone();
        let Some(found) = resolve_import(&importer, name) else {
            let dir = importer.parent().map(Path::to_path_buf).unwrap_or_default();
            self.diags.push(
                Diagnostic::error(format!("cannot find imported file `{name}`"))
                    .at(self.sources.location(span))
                    .with_label(format!(
                        "looked in `{}` and each folder above it",
                        dir.display()
                    ))
                    .with_note(self.chain_note(chain, None)),
            );
            return;
        };
        if let Some(&existing) = self.by_path.get(&found) {
            if chain.contains(&existing) {
                self.diags.push(
                    Diagnostic::error(format!("circular import of `{name}`"))
                        .at(self.sources.location(span))
                        .with_label("this file is already being imported")
                        .with_note(self.chain_note(chain, Some(existing))),
                );
            } else {
                // Already loaded through another import (a diamond): its machines are in.
                self.imports.insert((file, item), existing);
            }
            return;
        }
        let text = match std::fs::read_to_string(&found) {
            Ok(text) => text,
            Err(e) => {
                self.diags.push(
                    Diagnostic::error(format!(
                        "cannot read imported file `{}`: {e}",
                        found.display()
                    ))
                    .at(self.sources.location(span)),
                );
                return;
            }
        };
        let index = self.add(SourceFile {
            display: display_path(&found),
            path: found,
            text,
        });
        self.imports.insert((file, item), index);
        chain.push(index);
        self.follow(index, chain);
        chain.pop();
    }

    fn chain_note(&self, chain: &[usize], closing: Option<usize>) -> String {
        let names: Vec<&str> = chain
            .iter()
            .chain(closing.iter())
            .map(|&i| self.sources.files[i].display.as_str())
            .collect();
        format!("import chain: {}", names.join(" → "))
    }
}

/// Find an imported file: relative to the importer's folder, then to each folder above it.
fn resolve_import(importer: &Path, name: &str) -> Option<PathBuf> {
    let target = Path::new(name);
    if target.is_absolute() {
        return std::fs::canonicalize(target).ok();
    }
    importer
        .ancestors()
        .skip(1)
        .map(|dir| dir.join(target))
        .find(|candidate| candidate.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// Show a path relative to the working folder when it lies below it.
fn display_path(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| std::fs::canonicalize(cwd).ok())
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn state_machine_items(root: &Node) -> Option<Vec<Node>> {
    let NodeKind::Map(entries) = &root.kind else {
        return None;
    };
    let (_, value) = entries
        .iter()
        .find(|(k, _)| k.scalar() == Some("state_machines"))?;
    match &value.kind {
        NodeKind::Seq(items) => Some(items.clone()),
        _ => None,
    }
}

fn import_value(item: &Node) -> Option<&Node> {
    let NodeKind::Map(entries) = &item.kind else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k.scalar() == Some("import"))
        .map(|(_, v)| v)
}

/// Pass two: build the model from the parsed files, in import order.
struct Assembler<'a> {
    roots: &'a [Option<Node>],
    broken: &'a HashSet<usize>,
    imports: &'a HashMap<(usize, usize), usize>,
    visited: HashSet<usize>,
    config: Config,
    spans: Vec<MachineSpans>,
    action_spans: HashMap<String, Span>,
    queue_spans: HashMap<String, Span>,
    python_span: Option<Span>,
    schedule_spans: Vec<super::read::ObjSpans>,
}

impl Assembler<'_> {
    fn file(&mut self, cx: &mut Cx<'_>, file: usize, is_import: bool) {
        if !self.visited.insert(file) {
            return;
        }
        let Some(root) = &self.roots[file] else {
            if !self.broken.contains(&file) {
                let loc = cx.sources.location_at(file, Pos { line: 1, col: 0 }, 1);
                cx.push(
                    Diagnostic::error("the file is empty")
                        .at(loc)
                        .with_label("a machine file starts with `state_machines:`"),
                );
            }
            return;
        };
        let Some(top) = cx.fields(root, "a machine file's top level", TOP_KEYS) else {
            return;
        };
        for key in ["root_url", "enable_capabilities_check"] {
            let Some(node) = top.get(key) else { continue };
            if is_import {
                cx.error(
                    top.spans().key(key),
                    format!("`{key}` can only be set in the main file, not in an imported one"),
                    Some("move it to the file that imports this one".into()),
                );
            } else if key == "root_url" {
                self.config.root_url = cx.string(node, key);
            } else {
                self.config.enable_capabilities_check = cx.boolean(node, key);
            }
        }
        if let Some(node) = top.get("actions") {
            self.actions(cx, node, file);
        }
        if let Some(node) = top.get("queues") {
            self.queues(cx, node);
        }
        if let Some(node) = top.get("python") {
            self.python(cx, node, top.spans().key("python"), file);
        }
        if let Some(node) = top.get("schedules") {
            for (schedule, spans) in super::schedules::read(cx, node) {
                self.config.schedules.push(schedule);
                self.schedule_spans.push(spans);
            }
        }
        let Some(list) = top.get("state_machines") else {
            cx.error(
                root.span,
                "missing `state_machines`",
                Some("a machine file lists its machines under `state_machines:`".into()),
            );
            return;
        };
        let NodeKind::Seq(items) = &list.kind else {
            cx.error(
                list.span,
                format!(
                    "`state_machines` must be a list of machines and imports, found {}",
                    list.describe()
                ),
                None,
            );
            return;
        };
        for (i, item) in items.iter().enumerate() {
            if import_value(item).is_some() {
                let Some(f) = cx.fields(item, "an import entry", &["import"]) else {
                    continue;
                };
                if let Some(v) = f.get("import") {
                    cx.string(v, "import");
                }
                if let Some(&imported) = self.imports.get(&(file, i)) {
                    self.file(cx, imported, true);
                }
                continue;
            }
            let errors_before = cx.error_count();
            if let Some((machine, spans)) = build::machine(cx, item) {
                super::check::machine(cx, &machine, &spans, errors_before);
                self.config.machines.push(machine);
                self.spans.push(spans);
            }
        }
    }

    fn actions(&mut self, cx: &mut Cx<'_>, node: &Node, file: usize) {
        let NodeKind::Map(entries) = &node.kind else {
            if !node.is_null() {
                cx.error(
                    node.span,
                    format!(
                        "`actions` must map action names to bindings, found {}",
                        node.describe()
                    ),
                    None,
                );
            }
            return;
        };
        let dir = cx.sources.files[file]
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for (key, value) in entries {
            let Some(name) = key.scalar().filter(|s| !s.is_empty()) else {
                cx.error(key.span, "action names must be non-empty strings", None);
                continue;
            };
            if let Some(first) = self.action_spans.get(name) {
                let first = cx.sources.location(*first);
                cx.error(
                    key.span,
                    format!("action `{name}` is bound twice"),
                    Some(format!("first bound at {}:{}", first.file, first.line)),
                );
                continue;
            }
            let Some(f) = cx.fields(
                value,
                &format!("action `{name}`"),
                &[
                    "exec", "http", "headers", "timeout", "lines", "list", "batch", "into", "event",
                ],
            ) else {
                continue;
            };
            let kinds: Vec<&str> = ["exec", "http", "lines", "list"]
                .into_iter()
                .filter(|k| f.get(k).is_some())
                .collect();
            let binding = match kinds.as_slice() {
                [] => {
                    cx.error(
                        key.span,
                        format!("action `{name}` has no binding"),
                        Some("add `exec: [PROGRAM, ARGS...]` or `http: URL`, or a built-in `lines: FILE` or `list: KEY`".into()),
                    );
                    continue;
                }
                ["exec"] => {
                    for extra in ["batch", "into", "event", "headers"] {
                        if f.get(extra).is_some() {
                            cx.error(
                                f.spans().key(extra),
                                format!("`{extra}` belongs to `lines:` and `list:` bindings, not `exec:`"),
                                None,
                            );
                        }
                    }
                    let timeout = f.get("timeout").and_then(|n| cx.duration(n, "timeout"));
                    let Some(argv) = f.get("exec").and_then(|n| argv(cx, n)) else {
                        continue;
                    };
                    ActionBinding::Exec(ExecBinding {
                        argv,
                        working_dir: dir.clone(),
                        timeout,
                    })
                }
                ["http"] => {
                    let timeout = f.get("timeout").and_then(|n| cx.duration(n, "timeout"));
                    let Some(url) = f.get("http").and_then(|n| cx.string(n, "http")) else {
                        continue;
                    };
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        cx.error(
                            f.spans().value("http"),
                            format!("`http` must be an http:// or https:// URL, found `{url}`"),
                            None,
                        );
                        continue;
                    }
                    let mut headers = BTreeMap::new();
                    if let Some(node) = f.get("headers") {
                        match &node.kind {
                            NodeKind::Map(entries) => {
                                for (k, v) in entries {
                                    if let (Some(k), Some(v)) =
                                        (k.scalar(), cx.string(v, "headers"))
                                    {
                                        headers.insert(k.to_string(), v);
                                    }
                                }
                            }
                            _ => cx.error(
                                node.span,
                                "`headers` must map header names to values",
                                None,
                            ),
                        }
                    }
                    ActionBinding::Http(HttpBinding {
                        url,
                        timeout,
                        headers,
                    })
                }
                [kind] => {
                    if f.get("timeout").is_some() {
                        cx.error(
                            f.spans().key("timeout"),
                            "`timeout` belongs to `exec:` bindings",
                            None,
                        );
                    }
                    let source = f.get(kind).and_then(|n| cx.string(n, kind));
                    let batch = match f.get("batch") {
                        None => Some(100),
                        Some(n) => match cx.count(n, "batch") {
                            Some(0) => {
                                cx.error(n.span, "`batch` must be at least 1", None);
                                None
                            }
                            other => other,
                        },
                    };
                    let into = f
                        .get("into")
                        .and_then(|n| cx.string(n, "into"))
                        .unwrap_or_else(|| "items".to_string());
                    let event = match f.get("event") {
                        None => None,
                        Some(n) => match cx.string(n, "event") {
                            Some(e) if crate::machine::is_valid_event(&e) => Some(e),
                            Some(e) => {
                                cx.error(n.span, format!("invalid event name `{e}`"), None);
                                None
                            }
                            None => None,
                        },
                    };
                    let (Some(source), Some(batch)) = (source, batch) else {
                        continue;
                    };
                    if *kind == "lines" {
                        ActionBinding::Lines(LinesBinding {
                            path: PathBuf::from(source),
                            working_dir: dir.clone(),
                            batch,
                            into,
                            event,
                        })
                    } else {
                        ActionBinding::List(ListBinding {
                            key: source,
                            batch,
                            into,
                            event,
                        })
                    }
                }
                _ => {
                    cx.error(
                        key.span,
                        format!(
                            "action `{name}` has more than one binding ({})",
                            kinds.join(", ")
                        ),
                        Some("keep one of `exec:`, `lines:` and `list:`".into()),
                    );
                    continue;
                }
            };
            self.action_spans.insert(name.to_string(), key.span);
            self.config.actions.insert(name.to_string(), binding);
        }
    }

    fn queues(&mut self, cx: &mut Cx<'_>, node: &Node) {
        let NodeKind::Map(entries) = &node.kind else {
            if !node.is_null() {
                cx.error(
                    node.span,
                    format!(
                        "`queues` must map queue names to limits, found {}",
                        node.describe()
                    ),
                    None,
                );
            }
            return;
        };
        for (key, value) in entries {
            let Some(name) = key.scalar().filter(|s| !s.is_empty()) else {
                cx.error(key.span, "queue names must be non-empty strings", None);
                continue;
            };
            if self.queue_spans.contains_key(name) {
                cx.error(
                    key.span,
                    format!("queue `{name}` is configured twice"),
                    None,
                );
                continue;
            }
            let mut limits = QueueLimits::default();
            if !value.is_null() {
                let Some(f) = cx.fields(
                    value,
                    &format!("queue `{name}`"),
                    &["max_concurrent", "rate"],
                ) else {
                    continue;
                };
                if let Some(n) = f.get("max_concurrent") {
                    limits.max_concurrent = cx.count(n, "max_concurrent");
                    if limits.max_concurrent == Some(0) {
                        cx.error(n.span, "`max_concurrent` must be at least 1", None);
                    }
                }
                if let Some(n) = f.get("rate") {
                    limits.rate = rate(cx, n);
                }
            }
            self.queue_spans.insert(name.to_string(), key.span);
            self.config.queues.insert(name.to_string(), limits);
        }
    }

    /// The `python:` section (once across all files): import roots, host processes, the
    /// per-step timeout and the interpreter.
    fn python(&mut self, cx: &mut Cx<'_>, node: &Node, key: Span, file: usize) {
        if let Some(first) = self.python_span {
            let first = cx.sources.location(first);
            cx.error(
                key,
                "`python` is configured twice",
                Some(format!("first configured at {}:{}", first.file, first.line)),
            );
            return;
        }
        self.python_span = Some(key);
        let dir = cx.sources.files[file]
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut settings = PythonSettings {
            path: vec![dir.clone()],
            processes: None,
            timeout: None,
            interpreter: None,
            working_dir: dir.clone(),
            path_as_written: None,
        };
        if !node.is_null() {
            let Some(f) = cx.fields(
                node,
                "the `python` section",
                &["path", "processes", "timeout", "interpreter"],
            ) else {
                return;
            };
            if let Some(n) = f.get("path") {
                let entries: Vec<String> = match &n.kind {
                    NodeKind::Seq(items) => items
                        .iter()
                        .filter_map(|item| cx.string(item, "path"))
                        .collect(),
                    _ => cx.string(n, "path").into_iter().collect(),
                };
                if entries.is_empty() {
                    cx.error(
                        n.span,
                        "`path` needs at least one folder",
                        Some("write `path: [.]` for the folder of this file".into()),
                    );
                }
                settings.path = entries
                    .iter()
                    .map(|e| dir.join(e).components().collect())
                    .collect();
                settings.path_as_written = Some(entries);
            }
            if let Some(n) = f.get("processes") {
                settings.processes = cx.count(n, "processes");
                if settings.processes == Some(0) {
                    cx.error(n.span, "`processes` must be at least 1", None);
                }
            }
            if let Some(n) = f.get("timeout") {
                settings.timeout = cx.duration(n, "timeout");
                if settings.timeout.is_some_and(|t| t.is_zero()) {
                    cx.error(n.span, "`timeout` must be longer than zero", None);
                }
            }
            if let Some(n) = f.get("interpreter") {
                settings.interpreter = cx.string(n, "interpreter").filter(|i| !i.is_empty());
            }
        }
        self.config.python = Some(settings);
    }

    fn finish(&mut self, cx: &mut Cx<'_>, options: &LoadOptions) {
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, m) in self.config.machines.iter().enumerate() {
            if m.name.is_empty() {
                continue;
            }
            if let Some(&first) = names.get(m.name.as_str()) {
                let first = cx.sources.location(self.spans[first].obj.value("name"));
                cx.error(
                    self.spans[i].obj.value("name"),
                    format!("two machines are named `{}`", m.name),
                    Some(format!("the first is at {}:{}", first.file, first.line)),
                );
            } else {
                names.insert(&m.name, i);
            }
        }
        if !self.config.queues.is_empty() {
            self.undeclared_queues(cx);
        }
        self.check_schedules(cx);
        // With a `python:` section every other name is a Python action, checked when a
        // worker starts its hosts.
        let unbound_check = options.strict || (options.warn_unbound && cx.error_count() == 0);
        if unbound_check && self.config.python.is_none() {
            self.unbound_actions(cx, &options.registered_actions, options.strict);
        }
    }

    /// Schedule names are unique, and each starts a machine of the configuration.
    fn check_schedules(&self, cx: &mut Cx<'_>) {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, s) in self.config.schedules.iter().enumerate() {
            let spans = &self.schedule_spans[i];
            if let Some(&first) = seen.get(s.name.as_str()) {
                let first = cx
                    .sources
                    .location(self.schedule_spans[first].value("name"));
                cx.error(
                    spans.value("name"),
                    format!("two schedules are named `{}`", s.name),
                    Some(format!("the first is at {}:{}", first.file, first.line)),
                );
            } else {
                seen.insert(&s.name, i);
            }
            if self.config.machine(&s.machine).is_none() && !self.config.machines.is_empty() {
                let names = self.config.machines.iter().map(|m| m.name.as_str());
                let label = suggest(&s.machine, names).map_or_else(
                    || "name a machine of this file or its imports".to_string(),
                    |m| format!("did you mean `{m}`?"),
                );
                cx.error(
                    spans.value("machine"),
                    format!(
                        "schedule `{}` starts machine `{}`, which does not exist",
                        s.name, s.machine
                    ),
                    Some(label),
                );
            }
        }
    }

    /// With a `queues:` section, a queue name used but not declared there is likely a typo.
    fn undeclared_queues(&self, cx: &mut Cx<'_>) {
        let declared: Vec<&str> = self.config.queues.keys().map(String::as_str).collect();
        let check = |cx: &mut Cx<'_>, queue: &Option<String>, span: Span| {
            let Some(q) = queue else { return };
            if q == DEFAULT_QUEUE || self.config.queues.contains_key(q) {
                return;
            }
            let label = suggest(q, declared.iter().copied())
                .map_or("it runs without limits".to_string(), |s| {
                    format!("did you mean `{s}`?")
                });
            cx.warning(
                span,
                format!("queue `{q}` is not declared under `queues:`"),
                Some(label),
            );
        };
        for (m, spans) in self.config.machines.iter().zip(&self.spans) {
            check(cx, &m.queue, spans.obj.value("queue"));
            for (s, ss) in m.states.iter().zip(&spans.states) {
                for (t, ts) in s.transitions.iter().zip(&ss.transitions) {
                    check(cx, &t.queue, ts.value("queue"));
                }
            }
        }
    }

    /// Where each machine names its actions and events.
    fn sites(&self, cx: &Cx<'_>) -> Sites {
        let mut sites = Sites::default();
        let place = |span: Span| {
            let l = cx.sources.location(span);
            format!("{}:{}:{}", l.file, l.line, l.column)
        };
        for (m, spans) in self.config.machines.iter().zip(&self.spans) {
            for (s, ss) in m.states.iter().zip(&spans.states) {
                for (key, name) in [
                    ("entry", &s.entry),
                    ("action", &s.action),
                    ("exit", &s.exit),
                ] {
                    if name.is_some() {
                        sites.insert(&m.name, &s.name, key.into(), place(ss.obj.value(key)));
                    }
                }
                for (t, ts) in s.transitions.iter().zip(&ss.transitions) {
                    sites.insert(
                        &m.name,
                        &s.name,
                        format!("event:{}", t.event),
                        place(ts.value("event")),
                    );
                    if t.action.is_some() {
                        sites.insert(
                            &m.name,
                            &s.name,
                            format!("transition:{}", t.event),
                            place(ts.value("action")),
                        );
                    }
                }
            }
        }
        sites
    }

    fn unbound_actions(&self, cx: &mut Cx<'_>, registered: &[String], as_errors: bool) {
        let bound = |name: &str| {
            self.config.actions.contains_key(name) || registered.iter().any(|r| r == name)
        };
        for (m, spans) in self.config.machines.iter().zip(&self.spans) {
            for (s, ss) in m.states.iter().zip(&spans.states) {
                let ns = s.namespace.as_deref().or(m.namespace.as_deref());
                for key in ["entry", "action", "exit"] {
                    let name = match key {
                        "entry" => &s.entry,
                        "action" => &s.action,
                        _ => &s.exit,
                    };
                    if let Some(name) = name {
                        report_unbound(cx, name, ns, ss.obj.value(key), &bound, as_errors);
                    }
                }
                for (t, ts) in s.transitions.iter().zip(&ss.transitions) {
                    if let Some(name) = &t.action {
                        let ns = t.namespace.as_deref().or(m.namespace.as_deref());
                        report_unbound(cx, name, ns, ts.value("action"), &bound, as_errors);
                    }
                }
            }
        }
    }
}

fn report_unbound(
    cx: &mut Cx<'_>,
    name: &str,
    namespace: Option<&str>,
    span: Span,
    bound: &impl Fn(&str) -> bool,
    as_error: bool,
) {
    let qualified = namespace.map(|ns| format!("{ns}.{name}"));
    if bound(name) || qualified.as_deref().is_some_and(bound) {
        return;
    }
    let tried = match &qualified {
        Some(q) => format!("`{q}` or `{name}`"),
        None => format!("`{name}`"),
    };
    let message = format!("action `{name}` is not bound");
    let label = Some(format!("bind {tried} under `actions:` with an `exec:` program, add a `python:` section for Python actions, or register a Rust handler by that name"));
    if as_error {
        cx.error(span, message, label);
    } else {
        cx.warning(
            span,
            format!("{message}: `phasm run` and `phasm worker` refuse to start"),
            label,
        );
    }
}

/// `exec:` as a list of program and arguments, or one string split on whitespace.
fn argv(cx: &mut Cx<'_>, node: &Node) -> Option<Vec<String>> {
    let argv: Vec<String> = match &node.kind {
        NodeKind::Seq(items) => {
            let mut out = Vec::new();
            for item in items {
                out.push(cx.string(item, "exec")?);
            }
            out
        }
        NodeKind::Scalar { text, .. } if !node.is_null() => {
            text.split_whitespace().map(str::to_string).collect()
        }
        _ => Vec::new(),
    };
    if argv.is_empty() || argv[0].is_empty() {
        cx.error(
            node.span,
            "`exec` needs a program to run",
            Some("write `exec: [PROGRAM, ARGS...]`, e.g. `exec: [python3, actions/pay.py]`".into()),
        );
        return None;
    }
    Some(argv)
}

/// A rate such as `20/s`, `100/m`, `5/h`, `1/d`, or `10/30s`.
fn rate(cx: &mut Cx<'_>, node: &Node) -> Option<Rate> {
    let text = cx.string(node, "rate")?;
    let parsed = text.split_once('/').and_then(|(count, per)| {
        let count: u32 = count.trim().parse().ok().filter(|&c| c > 0)?;
        let per = match per.trim() {
            "s" | "sec" | "second" => std::time::Duration::from_secs(1),
            "m" | "min" | "minute" => std::time::Duration::from_secs(60),
            "h" | "hour" => std::time::Duration::from_secs(3600),
            "d" | "day" => std::time::Duration::from_secs(86_400),
            other => crate::duration::parse(other)
                .ok()
                .filter(|d| !d.is_zero())?,
        };
        Some(Rate { count, per })
    });
    if parsed.is_none() {
        cx.error(
            node.span,
            format!("`rate` must look like `20/s`, found `{text}`"),
            Some(
                "write COUNT/PERIOD with a period of s, m, h or d (or a duration such as 30s)"
                    .into(),
            ),
        );
    }
    parsed
}
