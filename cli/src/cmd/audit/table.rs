//! Aligned text tables for `custos audit`.

use super::emit;

/// A table: a header row and rows of cells, columns padded to their widest cell.
pub(crate) struct Table {
    headers: Vec<&'static str>,
    /// Columns aligned right (counts).
    right: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub(crate) fn new(headers: &[&'static str]) -> Table {
        Table { headers: headers.to_vec(), right: Vec::new(), rows: Vec::new() }
    }

    /// Aligns column `index` to the right.
    pub(crate) fn right(mut self, index: usize) -> Table {
        self.right.push(index);
        self
    }

    /// Adds a row; cells are cleaned of control characters.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.into_iter().map(|c| clean(&c)).collect());
    }

    /// Whether no row was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The lines of the table, header first.
    pub(crate) fn lines(&self) -> Vec<String> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        std::iter::once(&header).chain(&self.rows).map(|row| self.line(row, &widths)).collect()
    }

    fn line(&self, row: &[String], widths: &[usize]) -> String {
        let mut line = String::new();
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            let pad = width.saturating_sub(cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            if self.right.contains(&i) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i != last {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        line
    }

    /// Prints the table on stdout.
    pub(crate) fn print(&self) -> anyhow::Result<()> {
        for line in self.lines() {
            emit(&line)?;
        }
        Ok(())
    }
}

/// `s` with control characters (terminal escapes, newlines) replaced by `?`: cells come from
/// events that sidecars wrote.
pub(crate) fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let mut t = Table::new(&["A", "COUNT", "LAST"]).right(1);
        t.row(vec!["long value".into(), "7".into(), "x".into()]);
        t.row(vec!["b".into(), "1234".into(), "y\u{1b}[31m".into()]);
        assert_eq!(
            t.lines(),
            vec!["A           COUNT  LAST", "long value      7  x", "b            1234  y?[31m"]
        );
    }
}
