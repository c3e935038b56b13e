//! Maps config paths (`routes[2].match.path`) to the line they start on, so
//! that every error can name its line, including errors found long after
//! serde is done (dangling pool names, bad regexes, ...).

use std::collections::HashMap;

use saphyr_parser::{Event, Parser};

/// Deeper nodes than this are not recorded (their ancestors still are).
const MAX_DEPTH: usize = 64;

/// Path → 1-based line of the key (or sequence item) that starts it.
#[derive(Debug, Default)]
pub(crate) struct LineMap {
    lines: HashMap<String, usize>,
}

impl LineMap {
    /// Builds the map; a document the parser rejects yields a partial map
    /// (serde reports the syntax error itself).
    pub(crate) fn build(src: &str) -> Self {
        let events: Vec<(Event<'_>, usize)> = Parser::new_from_str(src)
            .map_while(Result::ok)
            .map(|(event, span)| (event, span.start.line()))
            .collect();
        let mut map = LineMap::default();
        let mut i = 0;
        while i < events.len() {
            match events[i].0 {
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    map.walk(&events, &mut i, "", 0);
                    break;
                }
                _ => i += 1,
            }
        }
        map
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub(crate) fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.lines.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    fn walk(&mut self, events: &[(Event<'_>, usize)], i: &mut usize, path: &str, depth: usize) {
        let Some((event, _)) = events.get(*i) else {
            return;
        };
        if depth > MAX_DEPTH {
            skip_node(events, i);
            return;
        }
        match event {
            Event::MappingStart(..) => {
                *i += 1;
                while let Some((event, line)) = events.get(*i) {
                    match event {
                        Event::MappingEnd => {
                            *i += 1;
                            return;
                        }
                        Event::Scalar(key, ..) => {
                            let child = join_key(path, key);
                            self.lines.entry(child.clone()).or_insert(*line);
                            *i += 1;
                            self.walk(events, i, &child, depth + 1);
                        }
                        _ => {
                            // A complex key: skip it and its value.
                            skip_node(events, i);
                            skip_node(events, i);
                        }
                    }
                }
            }
            Event::SequenceStart(..) => {
                *i += 1;
                let mut index = 0usize;
                while let Some((event, line)) = events.get(*i) {
                    if matches!(event, Event::SequenceEnd) {
                        *i += 1;
                        return;
                    }
                    let child = format!("{path}[{index}]");
                    self.lines.entry(child.clone()).or_insert(*line);
                    self.walk(events, i, &child, depth + 1);
                    index += 1;
                }
            }
            _ => *i += 1,
        }
    }
}

/// Skips one whole node without recursion.
fn skip_node(events: &[(Event<'_>, usize)], i: &mut usize) {
    let mut depth = 0usize;
    while let Some((event, _)) = events.get(*i) {
        *i += 1;
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) => depth += 1,
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth == 0 {
            return;
        }
    }
}

/// `parent.key`, or `key` at the root.
pub(crate) fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lines_of_nested_keys_and_items() {
        let src = "server:\n  listen: [\"a\"]\nroutes:\n  - name: x\n    match:\n      path: {prefix: /}\n  - name: y\n";
        let map = LineMap::build(src);
        assert_eq!(map.line_of("server.listen"), Some(2));
        assert_eq!(map.line_of("routes[0]"), Some(4));
        assert_eq!(map.line_of("routes[0].match.path.prefix"), Some(6));
        assert_eq!(map.line_of("routes[1].name"), Some(7));
        // Unknown leaf falls back to its parent.
        assert_eq!(map.line_of("routes[1].upstream"), Some(7));
        assert_eq!(map.line_of("nothing"), None);
    }

    #[test]
    fn test_deep_nesting_does_not_overflow() {
        let src = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let map = LineMap::build(&src);
        assert_eq!(map.line_of("[0]"), Some(1));
        // Deeper than MAX_DEPTH: not recorded, falls back to an ancestor.
        let deep = "[0]".repeat(99);
        assert_eq!(map.line_of(&deep), Some(1));
        assert!(!map.lines.contains_key(&deep));
        // Far deeper than the parser allows: no panic, no stack overflow.
        let src = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let _ = LineMap::build(&src).line_of("[0]");
    }
}
