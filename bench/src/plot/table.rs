//! A CSV table: a header line and rows of text cells (RFC 4180 quoting).

use super::PlotError;

/// A parsed CSV file. Cells stay text; columns are read as numbers on demand.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Row>,
}

/// One data row and the line of the file it started on, for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub line: usize,
    pub cells: Vec<String>,
}

impl Table {
    /// Parses CSV text whose first record is the header. Blank lines are skipped; every
    /// row must have as many cells as the header.
    pub fn parse(text: &str) -> Result<Table, PlotError> {
        let mut records = parse_records(text)?.into_iter();
        let Some((_, headers)) = records.next() else {
            return Err(PlotError::Csv {
                line: 1,
                message: "no header line".into(),
            });
        };
        let headers: Vec<String> = headers.into_iter().map(|h| h.trim().to_string()).collect();
        let mut rows = Vec::new();
        for (line, cells) in records {
            if cells.len() != headers.len() {
                return Err(PlotError::Csv {
                    line,
                    message: format!(
                        "{} cells, but the header has {} columns",
                        cells.len(),
                        headers.len()
                    ),
                });
            }
            rows.push(Row { line, cells });
        }
        Ok(Table { headers, rows })
    }

    /// The index of the column with this header.
    pub fn column(&self, name: &str) -> Result<usize, PlotError> {
        self.headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| PlotError::NoColumn {
                name: name.to_string(),
                available: self.headers.join(", "),
            })
    }

    /// Keeps only the rows whose cell in `column` equals `value`.
    pub fn filter(&mut self, column: &str, value: &str) -> Result<(), PlotError> {
        let idx = self.column(column)?;
        self.rows.retain(|row| row.cells[idx].trim() == value);
        Ok(())
    }
}

impl Row {
    /// The cell of column `idx` as a number; `None` for an empty cell (a missing value).
    pub fn number(&self, idx: usize, column_name: &str) -> Result<Option<f64>, PlotError> {
        let cell = self.cells[idx].trim();
        if cell.is_empty() {
            return Ok(None);
        }
        cell.parse::<f64>()
            .map(Some)
            .map_err(|_| PlotError::NotANumber {
                line: self.line,
                column: column_name.to_string(),
                value: cell.to_string(),
            })
    }
}

/// Splits CSV text into records of cells, each with the line it starts on. Quoted
/// cells may hold commas, doubled quotes and line breaks.
fn parse_records(text: &str) -> Result<Vec<(usize, Vec<String>)>, PlotError> {
    let mut records = Vec::new();
    let mut cells: Vec<String> = Vec::new();
    let mut cell = String::new();
    let mut line = 1;
    let mut record_line = 1;
    let mut in_quotes = false;
    // Whether the current cell was quoted; text after its closing quote is an error.
    let mut was_quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    cell.push(c);
                }
                _ => cell.push(c),
            }
            continue;
        }
        match c {
            '"' if cell.trim().is_empty() && !was_quoted => {
                cell.clear();
                in_quotes = true;
                was_quoted = true;
            }
            '"' => {
                return Err(PlotError::Csv {
                    line,
                    message: "a quote inside an unquoted cell".into(),
                })
            }
            ',' => {
                cells.push(std::mem::take(&mut cell));
                was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                end_record(&mut records, &mut cells, &mut cell, record_line, was_quoted);
                was_quoted = false;
                line += 1;
                record_line = line;
            }
            _ if was_quoted && !c.is_whitespace() => {
                return Err(PlotError::Csv {
                    line,
                    message: "text after a quoted cell".into(),
                })
            }
            _ => cell.push(c),
        }
    }
    if in_quotes {
        return Err(PlotError::Csv {
            line: record_line,
            message: "a quoted cell is not closed".into(),
        });
    }
    end_record(&mut records, &mut cells, &mut cell, record_line, was_quoted);
    Ok(records)
}

fn end_record(
    records: &mut Vec<(usize, Vec<String>)>,
    cells: &mut Vec<String>,
    cell: &mut String,
    line: usize,
    was_quoted: bool,
) {
    // A line with nothing on it is not a record with one empty cell.
    if cells.is_empty() && cell.trim().is_empty() && !was_quoted {
        cell.clear();
        return;
    }
    cells.push(std::mem::take(cell));
    records.push((line, std::mem::take(cells)));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_header_and_rows() {
        let table = Table::parse("a,b\n1,2\n3,4\n").unwrap();
        assert_eq!(table.headers, ["a", "b"]);
        assert_eq!(table.rows.len(), 2);
        assert_eq!(table.rows[1].cells, ["3", "4"]);
        assert_eq!(table.rows[1].line, 3);
    }

    #[test]
    fn quotes_commas_crlf_and_blank_lines() {
        let text = "name,value\r\n\"a, b\",1\r\n\r\n\"say \"\"hi\"\"\",2\r\n";
        let table = Table::parse(text).unwrap();
        assert_eq!(table.rows.len(), 2);
        assert_eq!(table.rows[0].cells, ["a, b", "1"]);
        assert_eq!(table.rows[1].cells, ["say \"hi\"", "2"]);
        assert_eq!(table.rows[1].line, 4);
    }

    #[test]
    fn quoted_line_break_and_missing_final_newline() {
        let table = Table::parse("a,b\n\"x\ny\",1\nz,2").unwrap();
        assert_eq!(table.rows[0].cells, ["x\ny", "1"]);
        assert_eq!(table.rows[1].cells, ["z", "2"]);
        assert_eq!(table.rows[1].line, 4);
    }

    #[test]
    fn rejects_ragged_rows_and_bad_quotes() {
        assert!(matches!(
            Table::parse("a,b\n1\n"),
            Err(PlotError::Csv { line: 2, .. })
        ));
        assert!(Table::parse("a\n\"open\n").is_err());
        assert!(Table::parse("a\nx\"y\n").is_err());
        assert!(Table::parse("a\n\"x\"y\n").is_err());
        assert!(Table::parse("").is_err());
    }

    #[test]
    fn columns_numbers_and_filters() {
        let mut table = Table::parse("kind,n\nx,1.5\ny,\nx,abc\n").unwrap();
        let n = table.column("n").unwrap();
        assert_eq!(table.rows[0].number(n, "n").unwrap(), Some(1.5));
        assert_eq!(table.rows[1].number(n, "n").unwrap(), None);
        assert_eq!(
            table.rows[2].number(n, "n"),
            Err(PlotError::NotANumber {
                line: 4,
                column: "n".into(),
                value: "abc".into()
            })
        );
        assert!(matches!(table.column("m"), Err(PlotError::NoColumn { .. })));
        table.filter("kind", "x").unwrap();
        assert_eq!(table.rows.len(), 2);
    }
}
