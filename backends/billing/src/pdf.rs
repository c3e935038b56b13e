//! Invoice and credit-note PDFs (A4), drawn with krilla.
//!
//! The fonts (Liberation Sans, SIL Open Font License 1.1, in
//! `assets/fonts/`) are compiled into the binary and embedded (subset) in
//! every PDF: nothing is read from the host or the network at render
//! time. The output is deterministic: no timestamp is written and the
//! document id is a hash of the content, so the same document renders to
//! the same bytes (the golden test compares them).
//!
//! Rendering is CPU work (a few milliseconds): callers run it on the
//! bounded blocking pool.

use krilla::color::rgb;
use krilla::geom::{PathBuilder, Point, Rect};
use krilla::metadata::Metadata;
use krilla::num::NormalizedF32;
use krilla::page::PageSettings;
use krilla::paint::{Fill, Stroke};
use krilla::surface::Surface;
use krilla::text::{Font, TextDirection};
use krilla::Document;

static REGULAR: &[u8] = include_bytes!("../../../assets/fonts/LiberationSans-Regular.ttf");
static BOLD: &[u8] = include_bytes!("../../../assets/fonts/LiberationSans-Bold.ttf");

/// A4 in points.
const PAGE_W: f32 = 595.28;
const PAGE_H: f32 = 841.89;
const LEFT: f32 = 50.0;
const RIGHT: f32 = PAGE_W - 50.0;
/// Below this a new page starts.
const BOTTOM: f32 = PAGE_H - 80.0;

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What it is.
    pub description: String,
    /// How many.
    pub quantity: String,
    /// Price of one, formatted.
    pub unit_price: String,
    /// quantity × unit price, formatted.
    pub amount: String,
}

/// The stamp across a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// None (open).
    None,
    /// "LUNAS" (paid), green.
    Paid,
    /// "BATAL" (void), red.
    Void,
}

/// A document as printed: every text already formatted.
#[derive(Debug, Clone)]
pub struct Sheet {
    /// `FAKTUR` or `NOTA KREDIT`.
    pub title: String,
    /// The seller's lines (name first).
    pub seller: Vec<String>,
    /// The buyer's lines (name first).
    pub buyer: Vec<String>,
    /// (label, value) pairs beside the buyer: number, dates, status.
    pub facts: Vec<(String, String)>,
    /// The table.
    pub rows: Vec<Row>,
    /// (label, value) pairs under the table; the last is bold.
    pub totals: Vec<(String, String)>,
    /// Lines of small print at the end.
    pub notes: Vec<String>,
    /// The stamp.
    pub stamp: Stamp,
    /// The PDF title (the number).
    pub pdf_title: String,
}

/// Why a PDF could not be made.
#[derive(Debug, thiserror::Error)]
#[error("rendering the PDF failed: {0}")]
pub struct RenderError(String);

struct Fonts {
    regular: Font,
    bold: Font,
    regular_face: rustybuzz::Face<'static>,
    bold_face: rustybuzz::Face<'static>,
}

impl Fonts {
    fn load() -> Result<Self, RenderError> {
        let missing = || RenderError("the bundled font cannot be read".to_owned());
        Ok(Self {
            regular: Font::new(REGULAR.into(), 0).ok_or_else(missing)?,
            bold: Font::new(BOLD.into(), 0).ok_or_else(missing)?,
            regular_face: rustybuzz::Face::from_slice(REGULAR, 0).ok_or_else(missing)?,
            bold_face: rustybuzz::Face::from_slice(BOLD, 0).ok_or_else(missing)?,
        })
    }

    /// The width of `text` at `size`, shaped as krilla shapes it.
    fn width(&self, text: &str, size: f32, bold: bool) -> f32 {
        let face = if bold {
            &self.bold_face
        } else {
            &self.regular_face
        };
        let mut buffer = rustybuzz::UnicodeBuffer::new();
        buffer.push_str(text);
        buffer.guess_segment_properties();
        let shaped = rustybuzz::shape(face, &[], buffer);
        let advance: i32 = shaped.glyph_positions().iter().map(|p| p.x_advance).sum();
        advance as f32 * size / f32::from(face.units_per_em().max(1) as u16)
    }
}

/// Draws on pages, starting new ones as the cursor reaches the bottom.
struct Writer<'a> {
    fonts: &'a Fonts,
    y: f32,
}

impl Writer<'_> {
    fn text(&self, s: &mut Surface<'_>, x: f32, y: f32, text: &str, size: f32, bold: bool) {
        let font = if bold {
            self.fonts.bold.clone()
        } else {
            self.fonts.regular.clone()
        };
        s.draw_text(
            Point::from_xy(x, y),
            font,
            size,
            text,
            false,
            TextDirection::LeftToRight,
        );
    }

    fn right(&self, s: &mut Surface<'_>, x: f32, y: f32, text: &str, size: f32, bold: bool) {
        let w = self.fonts.width(text, size, bold);
        self.text(s, x - w, y, text, size, bold);
    }

    /// Splits `text` into lines no wider than `width`.
    fn wrap(&self, text: &str, size: f32, width: f32) -> Vec<String> {
        let mut lines = Vec::new();
        let mut line = String::new();
        for word in text.split_whitespace() {
            let candidate = if line.is_empty() {
                word.to_owned()
            } else {
                format!("{line} {word}")
            };
            if self.fonts.width(&candidate, size, false) <= width || line.is_empty() {
                line = candidate;
            } else {
                lines.push(std::mem::take(&mut line));
                line = word.to_owned();
            }
        }
        if !line.is_empty() || lines.is_empty() {
            lines.push(line);
        }
        lines
    }
}

fn rule(s: &mut Surface<'_>, y: f32, width: f32) {
    let mut pb = PathBuilder::new();
    pb.move_to(LEFT, y);
    pb.line_to(RIGHT, y);
    if let Some(path) = pb.finish() {
        s.set_fill(None);
        s.set_stroke(Some(Stroke {
            paint: rgb::Color::new(160, 160, 160).into(),
            width,
            ..Stroke::default()
        }));
        s.draw_path(&path);
        s.set_stroke(None);
        s.set_fill(Some(Fill::default()));
    }
}

fn stamp(s: &mut Surface<'_>, w: &Writer<'_>, kind: Stamp, y: f32) {
    let (word, color) = match kind {
        Stamp::None => return,
        Stamp::Paid => ("LUNAS", rgb::Color::new(22, 128, 61)),
        Stamp::Void => ("BATAL", rgb::Color::new(185, 28, 28)),
    };
    let size = 40.0;
    let width = w.fonts.width(word, size, true);
    let x = LEFT + 30.0;
    if let Some(rect) = Rect::from_xywh(x - 10.0, y - size + 4.0, width + 20.0, size + 6.0) {
        let mut pb = PathBuilder::new();
        pb.push_rect(rect);
        if let Some(path) = pb.finish() {
            s.set_fill(None);
            s.set_stroke(Some(Stroke {
                paint: color.into(),
                width: 3.0,
                ..Stroke::default()
            }));
            s.draw_path(&path);
            s.set_stroke(None);
        }
    }
    s.set_fill(Some(Fill {
        paint: color.into(),
        opacity: NormalizedF32::ONE,
        ..Fill::default()
    }));
    w.text(s, x, y, word, size, true);
    s.set_fill(Some(Fill::default()));
}

/// Renders `sheet` to PDF bytes.
pub fn render(sheet: &Sheet) -> Result<Vec<u8>, RenderError> {
    let fonts = Fonts::load()?;
    let mut doc = Document::new();
    doc.set_metadata(
        Metadata::new()
            .title(sheet.pdf_title.clone())
            .language("id".to_owned()),
    );
    let settings =
        || PageSettings::from_wh(PAGE_W, PAGE_H).ok_or_else(|| RenderError("page size".to_owned()));
    let mut w = Writer {
        fonts: &fonts,
        y: 0.0,
    };
    let mut page = doc.start_page_with(settings()?);
    let mut s = page.surface();
    // Ends the page and starts the next, the cursor at its top.
    macro_rules! next_page {
        () => {
            drop(s);
            page.finish();
            page = doc.start_page_with(settings()?);
            s = page.surface();
            w.y = 70.0;
        };
    }

    // Header: title left, seller right.
    w.text(&mut s, LEFT, 80.0, &sheet.title, 22.0, true);
    let mut y = 62.0;
    for (i, line) in sheet.seller.iter().enumerate() {
        w.right(
            &mut s,
            RIGHT,
            y,
            line,
            if i == 0 { 11.0 } else { 9.0 },
            i == 0,
        );
        y += 13.0;
    }
    w.y = y.max(100.0) + 18.0;
    rule(&mut s, w.y, 0.8);
    w.y += 22.0;

    // Buyer left, facts right.
    let top = w.y;
    w.text(&mut s, LEFT, top, "Ditagihkan kepada", 9.0, true);
    let mut by = top + 15.0;
    for (i, line) in sheet.buyer.iter().enumerate() {
        for part in w.wrap(line, 10.0, 250.0) {
            w.text(&mut s, LEFT, by, &part, 10.0, i == 0);
            by += 13.0;
        }
    }
    let mut fy = top;
    for (label, value) in &sheet.facts {
        w.text(&mut s, 330.0, fy, label, 9.0, false);
        w.right(&mut s, RIGHT, fy, value, 10.0, true);
        fy += 15.0;
    }
    w.y = by.max(fy) + 20.0;

    // The table.
    let header = |w: &Writer<'_>, s: &mut Surface<'_>, y: f32| {
        w.text(s, LEFT, y, "Deskripsi", 9.0, true);
        w.right(s, 360.0, y, "Jumlah", 9.0, true);
        w.right(s, 450.0, y, "Harga satuan", 9.0, true);
        w.right(s, RIGHT, y, "Total", 9.0, true);
        rule(s, y + 6.0, 0.5);
    };
    header(&w, &mut s, w.y);
    w.y += 22.0;
    for row in &sheet.rows {
        let lines = w.wrap(&row.description, 10.0, 260.0);
        let needed = 14.0 * lines.len() as f32 + 6.0;
        if w.y + needed > BOTTOM {
            next_page!();
            header(&w, &mut s, w.y);
            w.y += 22.0;
        }
        w.right(&mut s, 360.0, w.y, &row.quantity, 10.0, false);
        w.right(&mut s, 450.0, w.y, &row.unit_price, 10.0, false);
        w.right(&mut s, RIGHT, w.y, &row.amount, 10.0, false);
        for line in &lines {
            w.text(&mut s, LEFT, w.y, line, 10.0, false);
            w.y += 14.0;
        }
        w.y += 6.0;
    }
    rule(&mut s, w.y - 8.0, 0.5);

    // Totals, right; the stamp left of them.
    let needed = 16.0 * sheet.totals.len() as f32 + 30.0 + 14.0 * sheet.notes.len() as f32;
    if w.y + needed > BOTTOM {
        next_page!();
    }
    w.y += 10.0;
    let stamp_at = w.y + 30.0;
    let last = sheet.totals.len().saturating_sub(1);
    for (i, (label, value)) in sheet.totals.iter().enumerate() {
        let bold = i == last;
        let size = if bold { 12.0 } else { 10.0 };
        if bold {
            rule(&mut s, w.y - 11.0, 0.5);
            w.y += 4.0;
        }
        w.right(&mut s, 440.0, w.y, label, size, bold);
        w.right(&mut s, RIGHT, w.y, value, size, bold);
        w.y += 17.0;
    }
    stamp(&mut s, &w, sheet.stamp, stamp_at);
    w.y += 24.0;
    for note in &sheet.notes {
        for line in w.wrap(note, 8.0, RIGHT - LEFT) {
            w.text(&mut s, LEFT, w.y, &line, 8.0, false);
            w.y += 11.0;
        }
    }
    drop(s);
    page.finish();
    doc.finish().map_err(|e| RenderError(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sheet(rows: usize) -> Sheet {
        Sheet {
            title: "FAKTUR".to_owned(),
            seller: vec!["PT Penjual".to_owned(), "Jakarta".to_owned()],
            buyer: vec!["PT Pembeli".to_owned()],
            facts: vec![("Nomor".to_owned(), "INV/2026/12/000001".to_owned())],
            rows: (0..rows)
                .map(|i| Row {
                    description: format!("Baris {i} dengan deskripsi yang cukup panjang untuk dibungkus ke baris berikutnya di tabel"),
                    quantity: "1".to_owned(),
                    unit_price: "Rp 1.000".to_owned(),
                    amount: "Rp 1.000".to_owned(),
                })
                .collect(),
            totals: vec![("Total".to_owned(), "Rp 1.110".to_owned())],
            notes: vec!["Catatan".to_owned()],
            stamp: Stamp::Paid,
            pdf_title: "INV/2026/12/000001".to_owned(),
        }
    }

    #[test]
    fn test_render_is_deterministic_and_paginates() {
        let one = render(&sheet(3)).unwrap();
        assert!(one.starts_with(b"%PDF-"));
        assert_eq!(one, render(&sheet(3)).unwrap(), "same sheet, same bytes");
        // 100 wrapped rows do not fit one page: more pages, more bytes
        // (the e2e test counts the pages with pdfinfo).
        let long = render(&sheet(100)).unwrap();
        assert!(long.len() > one.len());
    }

    #[test]
    fn test_widths_are_measured() {
        let fonts = Fonts::load().unwrap();
        let w = fonts.width("Rp 1.234.567", 10.0, false);
        assert!((40.0..80.0).contains(&w), "{w}");
        assert!(fonts.width("LUNAS", 10.0, true) > fonts.width("LUNAS", 10.0, false));
    }
}
