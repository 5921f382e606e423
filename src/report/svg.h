// A small SVG plotting module for the study report: line plots (also scatter),
// grouped bar charts and heatmaps, each rendered to one self-contained <svg>
// string (no scripts, no external fonts or styles). The pieces are pure
// functions — tick placement, scaling, number formatting, escaping — so they
// can be tested against hand values (tests/test_report_svg.cpp).
#pragma once
#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace moecpt::report {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Escapes & < > " ' for use in XML/HTML text and attribute values.
std::string xml_escape(std::string_view s);

// "Nice" axis ticks: a step of 1, 2 or 5 × 10^n so that [lo, hi] is covered by
// at most `max_ticks` ticks; the axis range is widened to whole steps.
// lo == hi is widened to a unit-sized interval around the value.
struct Ticks {
  double lo = 0, hi = 1, step = 1;
  std::vector<double> values;  // lo, lo+step, …, hi
};
Ticks nice_ticks(double lo, double hi, int max_ticks = 6);
// Decade ticks for a log axis covering [lo, hi] (both > 0): 10^a … 10^b.
Ticks log_ticks(double lo, double hi);

// A tick label: as many decimals as the step needs (0.25 → "0.25", 50 → "50"),
// large magnitudes with an SI suffix (12000 → "12k", 3.5e9 → "3.5G"), "-0" never.
std::string format_tick(double v, double step);
// A number with `sig` significant digits and an SI suffix (k, M, G, T, P) above 10^4:
// 1234 → "1234", 123456 → "123k", 2.5e12 → "2.5T".
std::string format_si(double v, int sig = 3);
// Fixed decimals, "–" for NaN: fmt_fixed(0.0412, 3) = "0.041".
std::string fmt_fixed(double v, int decimals);

// Affine (or log10) map of the data interval [d0, d1] onto pixels [r0, r1].
struct Scale {
  double d0 = 0, d1 = 1, r0 = 0, r1 = 1;
  bool log = false;
  double operator()(double v) const;
};

// Categorical colours (Okabe–Ito, colour-blind safe), cycling after 8.
std::string palette(size_t i);
// Sequential colour map (viridis, 9 anchors, linearly interpolated) at t ∈ [0, 1].
std::string viridis(double t);
// Diverging map (blue – white – red) at t ∈ [-1, 1].
std::string diverging(double t);

struct Series {
  std::string name;
  std::vector<double> x, y;  // NaN y values break the line
  std::string color;         // empty: palette by position
  bool dashed = false;
  bool line = true;          // false: markers only (scatter)
  bool markers = false;      // circles at the points
  double width = 1.8;
};
struct RefLine {
  double at = 0;
  std::string label;
  std::string color = "#555";
};

struct LinePlot {
  std::string title;
  std::string x_label, y_label;  // with units, e.g. "tokens seen (M)", "loss (nats/token)"
  std::vector<Series> series;
  std::vector<RefLine> vlines;   // vertical markers (e.g. the PT→CPT shift)
  std::vector<RefLine> hlines;   // horizontal references (e.g. balanced MRI = k/E)
  double width = 480, height = 300;
  bool log_x = false, log_y = false;
  double x_min = kNaN, x_max = kNaN, y_min = kNaN, y_max = kNaN;  // NaN: from the data
  bool legend = true;
};
std::string render_line_plot(const LinePlot& p);

struct BarSeries {
  std::string name;
  std::vector<double> values;  // one per category; NaN = no bar
  std::string color;
};
struct BarChart {
  std::string title;
  std::string y_label;
  std::vector<std::string> categories;
  std::vector<BarSeries> series;  // grouped side by side within each category
  std::vector<RefLine> hlines;
  double width = 480, height = 300;
  bool value_labels = true;
  int value_decimals = 3;
  bool legend = true;
};
std::string render_bar_chart(const BarChart& b);

struct Heatmap {
  std::string title;
  std::string x_label, y_label;
  std::vector<std::string> row_labels, col_labels;
  std::vector<std::vector<double>> values;  // [row][col]
  double vmin = kNaN, vmax = kNaN;           // NaN: from the data
  bool diverging = false;                    // centre the colours on 0
  std::string colorbar_label;
  double width = 480, height = 220;
  bool annotate = false;                     // print values in cells
  int decimals = 2;
};
std::string render_heatmap(const Heatmap& h);

// Approximate rendered width (px) of `s` at `font_px` in a sans-serif font.
double text_width(std::string_view s, double font_px);

}  // namespace moecpt::report
