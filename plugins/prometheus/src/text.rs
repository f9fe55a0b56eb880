//! The text exposition format 0.0.4: one `# HELP` and `# TYPE` per family, then its samples;
//! label values and help text escaped; every line ends with `\n`.

use std::fmt::Write;

/// What a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Goes only up (restarts from zero with the server or a reload).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count.
    Histogram,
}

/// Writes the exposition text.
#[derive(Debug, Default)]
pub struct Writer {
    /// The text so far.
    pub out: String,
}

impl Writer {
    /// Starts a family: its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = write!(self.out, "# HELP {name} ");
        for c in help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                c => self.out.push(c),
            }
        }
        let _ = writeln!(self.out, "\n# TYPE {name} {kind}");
    }

    /// One sample: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                escape_label(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        number(&mut self.out, value);
        self.out.push('\n');
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A value as Prometheus reads it: integers without a fraction, `+Inf`, `-Inf`, `NaN`.
pub fn number(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut w = Writer::default();
        w.family("a_total", Kind::Counter, "line\\one\ntwo \"q\"");
        w.sample("a_total", &[("route", "/x\"y\\z\nw")], 1.5);
        w.sample("a_total", &[], f64::INFINITY);
        assert_eq!(
            w.out,
            "# HELP a_total line\\\\one\\ntwo \"q\"\n# TYPE a_total counter\n\
             a_total{route=\"/x\\\"y\\\\z\\nw\"} 1.5\na_total +Inf\n"
        );
    }

    #[test]
    fn numbers_are_written_as_prometheus_reads_them() {
        let mut s = String::new();
        for v in [3.0, 0.25, f64::NAN, f64::NEG_INFINITY, 1e20] {
            number(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "3 0.25 NaN -Inf 100000000000000000000 ");
    }
}
