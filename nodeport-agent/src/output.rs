//! How the inspecting commands (`status`, `dump`, `ports`) print: `-o table|wide|json|yaml`,
//! onto a standard output that the reader may close early (`| head`).

use std::io;

use serde::Serialize;

/// `--output` / `-o`, kubectl's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people: the text report.
    #[default]
    Table,
    /// The text report with everything it can show (long lists unabridged, more columns).
    Wide,
    /// One JSON document.
    Json,
    /// The same document as YAML.
    Yaml,
}

impl OutputFormat {
    /// The text report (`table` or `wide`) rather than a document.
    pub fn is_text(self) -> bool {
        matches!(self, Self::Table | Self::Wide)
    }

    /// `value` as this format: `text(wide)` for the text report, the serialized document
    /// otherwise.
    pub fn render<T: Serialize>(
        self,
        value: &T,
        text: impl FnOnce(bool) -> String,
    ) -> anyhow::Result<String> {
        Ok(match self {
            Self::Table => text(false),
            Self::Wide => text(true),
            Self::Json => serde_json::to_string_pretty(value)? + "\n",
            Self::Yaml => serde_norway::to_string(value)?,
        })
    }
}

/// Writes `text` to standard output. A reader that went away (`nodeport-agent ports | head`)
/// is not an error: the rest is not wanted.
pub fn print(text: &str) -> io::Result<()> {
    write_to(&mut io::stdout().lock(), text)
}

fn write_to(out: &mut impl io::Write, text: &str) -> io::Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Keeps the first `limit` items of a list for the text report, unless `wide`; returns them
/// and how many were left out.
pub fn abridge<T>(items: &[T], wide: bool, limit: usize) -> (&[T], usize) {
    if wide || items.len() <= limit {
        (items, 0)
    } else {
        (&items[..limit], items.len() - limit)
    }
}

/// An error and its causes on one line, each cause once: `context: cause: root cause`. Error
/// types that put their source into their own message (thiserror's `"{what}: {source}"`, aya's
/// and kube's errors) would otherwise repeat it, as `{:#}` prints every source after the
/// message that already holds it.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(err);
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    struct ClosedPipe;

    impl io::Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Full;

    impl io::Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_reader_is_not_an_error_but_a_full_disk_is() {
        write_to(&mut ClosedPipe, "text\n").unwrap();
        assert!(write_to(&mut Full, "text\n").is_err());
    }

    #[test]
    fn every_format_renders() {
        #[derive(Serialize)]
        struct View {
            name: &'static str,
            ports: Vec<u16>,
        }
        let view = View {
            name: "web",
            ports: vec![30080],
        };
        let text = |wide: bool| if wide { "wide\n" } else { "table\n" }.to_owned();
        let render = |format: OutputFormat| format.render(&view, text).unwrap();
        assert_eq!(render(OutputFormat::Table), "table\n");
        assert_eq!(render(OutputFormat::Wide), "wide\n");
        assert_eq!(
            render(OutputFormat::Json),
            "{\n  \"name\": \"web\",\n  \"ports\": [\n    30080\n  ]\n}\n"
        );
        assert_eq!(render(OutputFormat::Yaml), "name: web\nports:\n- 30080\n");
    }

    #[test]
    fn each_cause_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("map {name}: {source}")]
        struct MapError {
            name: &'static str,
            #[source]
            source: io::Error,
        }
        let root = io::Error::from_raw_os_error(libc::ENOENT);
        let err = anyhow::Error::new(MapError {
            name: "NP_CONFIG",
            source: root,
        })
        .context("no nodeport datapath pinned at /x");
        // What `{:#}` printed: the cause twice.
        assert_eq!(
            format!("{err:#}"),
            "no nodeport datapath pinned at /x: map NP_CONFIG: No such file or directory (os \
             error 2): No such file or directory (os error 2)"
        );
        assert_eq!(
            error_chain(err.as_ref()),
            "no nodeport datapath pinned at /x: map NP_CONFIG: No such file or directory (os \
             error 2)"
        );
        // Causes that add something are kept.
        let err = anyhow::anyhow!("root").context("middle").context("top");
        assert_eq!(error_chain(err.as_ref()), "top: middle: root");
    }

    #[test]
    fn long_lists_are_abridged_unless_wide() {
        let items = [1, 2, 3, 4, 5];
        assert_eq!(abridge(&items, false, 3), (&items[..3], 2));
        assert_eq!(abridge(&items, true, 3), (&items[..], 0));
        assert_eq!(abridge(&items, false, 5), (&items[..], 0));
    }
}
