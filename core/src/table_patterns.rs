//! The `add-tables` / `filter-tables` decoding options, read exactly as wal2json reads them
//! (`string_to_SelectTable` and `parse_table_identifier` in wal2json.c):
//!
//! - the value is a comma-separated list; whitespace around each element is skipped, and an
//!   unescaped whitespace character inside an element is a syntax error;
//! - a backslash makes the next character part of the name, whatever it is (`\,` a comma, `\ ` a
//!   space, `\.` a dot, `\\` a backslash, `\*` a star), and is itself dropped;
//! - each element is `schema.table`, split at the first unescaped dot; later dots belong to the
//!   table name;
//! - an element starting with an unescaped `*.` stands for every schema, and a table part that is
//!   exactly an unescaped `*` for every table; a `*` anywhere else is an ordinary character.
//!
//! Where wal2json would silently match nothing or read past its input, this refuses the value
//! instead: an element without a dot, an empty schema or table name, a trailing backslash.

/// One `schema.table` element; `None` stands for any schema or any table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePattern {
    pub schema: Option<String>,
    pub table: Option<String>,
}

impl TablePattern {
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        self.schema.as_deref().is_none_or(|s| s == schema)
            && self.table.as_deref().is_none_or(|t| t == table)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TablePatternError {
    #[error("an empty name between commas in \"{0}\"")]
    EmptyElement(String),
    #[error("unescaped whitespace inside \"{0}\" (escape it with a backslash)")]
    Whitespace(String),
    #[error("\"{0}\" ends with a backslash that escapes nothing")]
    TrailingBackslash(String),
    #[error("\"{0}\" is not schema.table (escape a dot that belongs to a name)")]
    NoDot(String),
    #[error("\"{0}\" has an empty schema or table name, which no table has")]
    EmptyName(String),
}

/// wal2json's `isspace` in the C locale.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

/// Parses an option value into its patterns; the empty value (or only whitespace) gives none.
pub fn parse_table_patterns(value: &str) -> Result<Vec<TablePattern>, TablePatternError> {
    let chars: Vec<char> = value.chars().collect();
    let mut i = 0;
    while i < chars.len() && is_space(chars[i]) {
        i += 1;
    }
    let mut out = Vec::new();
    if i == chars.len() {
        return Ok(out);
    }
    loop {
        let start = i;
        while i < chars.len() && chars[i] != ',' && !is_space(chars[i]) {
            if chars[i] == '\\' {
                i += 1;
                if i == chars.len() {
                    return Err(TablePatternError::TrailingBackslash(value.to_owned()));
                }
            }
            i += 1;
        }
        let element: String = chars[start..i].iter().collect();
        if element.is_empty() {
            return Err(TablePatternError::EmptyElement(value.to_owned()));
        }
        while i < chars.len() && is_space(chars[i]) {
            i += 1;
        }
        let done = match chars.get(i) {
            None => true,
            Some(',') => {
                i += 1;
                while i < chars.len() && is_space(chars[i]) {
                    i += 1;
                }
                false
            }
            Some(_) => return Err(TablePatternError::Whitespace(element)),
        };
        out.push(parse_element(&element)?);
        if done {
            return Ok(out);
        }
    }
}

/// One element, split at its first unescaped dot, escapes removed.
fn parse_element(element: &str) -> Result<TablePattern, TablePatternError> {
    let all_schemas = element.starts_with("*.");
    let mut schema = String::new();
    let mut chars = element.chars();
    let mut found_dot = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) => schema.push(e),
                None => return Err(TablePatternError::TrailingBackslash(element.to_owned())),
            },
            '.' => {
                found_dot = true;
                break;
            }
            c => schema.push(c),
        }
    }
    if !found_dot {
        return Err(TablePatternError::NoDot(element.to_owned()));
    }
    let rest = chars.as_str();
    let all_tables = rest == "*";
    let mut table = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e) => table.push(e),
                None => return Err(TablePatternError::TrailingBackslash(element.to_owned())),
            }
        } else {
            table.push(c);
        }
    }
    if schema.is_empty() || table.is_empty() {
        return Err(TablePatternError::EmptyName(element.to_owned()));
    }
    Ok(TablePattern {
        schema: (!all_schemas).then_some(schema),
        table: (!all_tables).then_some(table),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: Option<&str>, t: Option<&str>) -> TablePattern {
        TablePattern {
            schema: s.map(str::to_owned),
            table: t.map(str::to_owned),
        }
    }

    #[test]
    fn plain_lists_and_whitespace() {
        assert_eq!(parse_table_patterns("").unwrap(), []);
        assert_eq!(parse_table_patterns("  \t").unwrap(), []);
        assert_eq!(
            parse_table_patterns(" public.a ,\ts.b").unwrap(),
            [p(Some("public"), Some("a")), p(Some("s"), Some("b"))]
        );
    }

    #[test]
    fn escapes_make_the_next_character_part_of_the_name() {
        assert_eq!(
            parse_table_patterns(r"public.filter\ table_6").unwrap(),
            [p(Some("public"), Some("filter table_6"))]
        );
        assert_eq!(
            parse_table_patterns(r"public.a\,b,x.y").unwrap(),
            [p(Some("public"), Some("a,b")), p(Some("x"), Some("y"))]
        );
        assert_eq!(
            parse_table_patterns(r"my\.schema.t\\x").unwrap(),
            [p(Some("my.schema"), Some(r"t\x"))]
        );
        // Later dots belong to the table name, as in wal2json.
        assert_eq!(
            parse_table_patterns("a.b.c").unwrap(),
            [p(Some("a"), Some("b.c"))]
        );
        assert_eq!(
            parse_table_patterns(r"s\ü.t").unwrap(),
            [p(Some("sü"), Some("t"))]
        );
    }

    #[test]
    fn stars_are_wildcards_only_where_wal2json_has_them() {
        assert_eq!(parse_table_patterns("*.*").unwrap(), [p(None, None)]);
        assert_eq!(parse_table_patterns("*.t").unwrap(), [p(None, Some("t"))]);
        assert_eq!(parse_table_patterns("s.*").unwrap(), [p(Some("s"), None)]);
        assert_eq!(
            parse_table_patterns(r"\*.\*").unwrap(),
            [p(Some("*"), Some("*"))]
        );
        assert_eq!(
            parse_table_patterns("s*.t*").unwrap(),
            [p(Some("s*"), Some("t*"))]
        );
        assert!(p(None, Some("t")).matches("any", "t"));
        assert!(!p(None, Some("t")).matches("any", "u"));
        assert!(p(Some("s"), None).matches("s", "u"));
        assert!(!p(Some("*"), Some("t")).matches("s", "t"));
    }

    #[test]
    fn what_wal2json_refuses_or_cannot_match_is_refused() {
        for (bad, want) in [
            (
                "public.filter table_6",
                TablePatternError::Whitespace("public.filter".into()),
            ),
            ("nodot", TablePatternError::NoDot("nodot".into())),
            (r"a\.b", TablePatternError::NoDot(r"a\.b".into())),
            (
                "a.b,,c.d",
                TablePatternError::EmptyElement("a.b,,c.d".into()),
            ),
            ("a.b,", TablePatternError::EmptyElement("a.b,".into())),
            (
                r"a.b\",
                TablePatternError::TrailingBackslash(r"a.b\".into()),
            ),
            (".t", TablePatternError::EmptyName(".t".into())),
            ("s.", TablePatternError::EmptyName("s.".into())),
        ] {
            assert_eq!(parse_table_patterns(bad), Err(want), "{bad}");
        }
    }
}
