#include "report/svg.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <sstream>

namespace moecpt::report {

namespace {

constexpr double kFont = 11;        // tick labels, legend
constexpr double kTitleFont = 13;
constexpr const char* kAxis = "#333";
constexpr const char* kGrid = "#e4e4e4";
constexpr const char* kText = "#222";

std::string num(double v) {  // compact coordinate
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  std::string s = buf;
  if (s.size() > 2 && s.compare(s.size() - 2, 2, ".0") == 0) s.resize(s.size() - 2);
  if (s == "-0") s = "0";
  return s;
}

// Unique ids for clip paths: several SVGs share one HTML document's id space.
std::string next_id(const char* stem) {
  static std::atomic<int> counter{0};
  return std::string(stem) + std::to_string(++counter);
}

struct Box {
  double left, top, right, bottom;  // plot area in pixels
  double w() const { return right - left; }
  double h() const { return bottom - top; }
};

std::string text(double x, double y, std::string_view s, const char* anchor = "start", double size = kFont,
                 const std::string& extra = "") {
  return "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\" font-size=\"" + num(size) + "\" text-anchor=\"" + anchor +
         "\" fill=\"" + kText + "\"" + extra + ">" + xml_escape(s) + "</text>";
}

std::string open_svg(double w, double h, const std::string& title) {
  return "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"plot\" width=\"" + num(w) + "\" height=\"" + num(h) +
         "\" viewBox=\"0 0 " + num(w) + " " + num(h) +
         "\" font-family=\"Helvetica, Arial, sans-serif\" role=\"img\" aria-label=\"" + xml_escape(title) +
         "\"><title>" + xml_escape(title) + "</title>" + "<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>" +
         (title.empty() ? "" : text(8, 17, title, "start", kTitleFont, " font-weight=\"bold\""));
}

// Y axis: grid lines, tick labels and the rotated label.
std::string y_axis(const Box& b, const Scale& ys, const Ticks& t, const std::string& label, bool log) {
  std::string s;
  for (double v : t.values) {
    const double y = ys(v);
    s += "<line x1=\"" + num(b.left) + "\" x2=\"" + num(b.right) + "\" y1=\"" + num(y) + "\" y2=\"" + num(y) +
         "\" stroke=\"" + kGrid + "\"/>";
    s += text(b.left - 5, y + 3.5, log ? format_si(v) : format_tick(v, t.step), "end");
  }
  s += "<line x1=\"" + num(b.left) + "\" x2=\"" + num(b.left) + "\" y1=\"" + num(b.top) + "\" y2=\"" + num(b.bottom) +
       "\" stroke=\"" + kAxis + "\"/>";
  if (!label.empty()) {
    const double cx = 12, cy = (b.top + b.bottom) / 2;
    s += text(cx, cy, label, "middle", kFont, " transform=\"rotate(-90 " + num(cx) + " " + num(cy) + ")\"");
  }
  return s;
}

std::string x_axis(const Box& b, const Scale& xs, const Ticks& t, const std::string& label, bool log) {
  std::string s;
  for (double v : t.values) {
    const double x = xs(v);
    s += "<line x1=\"" + num(x) + "\" x2=\"" + num(x) + "\" y1=\"" + num(b.top) + "\" y2=\"" + num(b.bottom) +
         "\" stroke=\"" + kGrid + "\"/>";
    s += "<line x1=\"" + num(x) + "\" x2=\"" + num(x) + "\" y1=\"" + num(b.bottom) + "\" y2=\"" + num(b.bottom + 4) +
         "\" stroke=\"" + kAxis + "\"/>";
    s += text(x, b.bottom + 15, log ? format_si(v) : format_tick(v, t.step), "middle");
  }
  s += "<line x1=\"" + num(b.left) + "\" x2=\"" + num(b.right) + "\" y1=\"" + num(b.bottom) + "\" y2=\"" +
       num(b.bottom) + "\" stroke=\"" + kAxis + "\"/>";
  if (!label.empty()) s += text((b.left + b.right) / 2, b.bottom + 31, label, "middle");
  return s;
}

struct LegendItem {
  std::string name, color;
  bool dashed = false, swatch = false;  // swatch: a filled square (bars) instead of a line
};
double legend_width(const std::vector<LegendItem>& items) {
  double w = 0;
  for (const auto& i : items) w = std::max(w, text_width(i.name, kFont));
  return items.empty() ? 0 : w + 34;
}
std::string legend(double x, double y, const std::vector<LegendItem>& items) {
  std::string s = "<g class=\"legend\">";
  for (size_t i = 0; i < items.size(); ++i) {
    const double yy = y + 15 * double(i);
    const auto& it = items[i];
    if (it.swatch)
      s += "<rect x=\"" + num(x) + "\" y=\"" + num(yy - 8) + "\" width=\"16\" height=\"10\" fill=\"" + it.color + "\"/>";
    else
      s += "<line x1=\"" + num(x) + "\" x2=\"" + num(x + 18) + "\" y1=\"" + num(yy - 3.5) + "\" y2=\"" +
           num(yy - 3.5) + "\" stroke=\"" + it.color + "\" stroke-width=\"2.2\"" +
           (it.dashed ? " stroke-dasharray=\"5 3\"" : "") + "/>";
    s += text(x + 24, yy, it.name);
  }
  return s + "</g>";
}

void finite_range(const std::vector<double>& v, double& lo, double& hi) {
  for (double x : v)
    if (std::isfinite(x)) {
      lo = std::min(lo, x);
      hi = std::max(hi, x);
    }
}

std::string interpolate(const std::vector<std::array<int, 3>>& anchors, double t) {
  if (!std::isfinite(t)) return "#ccc";
  t = std::clamp(t, 0.0, 1.0);
  const double pos = t * double(anchors.size() - 1);
  const size_t i = std::min(anchors.size() - 2, size_t(pos));
  const double f = pos - double(i);
  char buf[8];
  int c[3];
  for (int k = 0; k < 3; ++k) c[k] = int(std::lround(anchors[i][k] + f * (anchors[i + 1][k] - anchors[i][k])));
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", c[0], c[1], c[2]);
  return buf;
}

}  // namespace

std::string xml_escape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  return out;
}

Ticks nice_ticks(double lo, double hi, int max_ticks) {
  Ticks t;
  if (!std::isfinite(lo) || !std::isfinite(hi)) lo = 0, hi = 1;
  if (lo > hi) std::swap(lo, hi);
  if (hi - lo < 1e-12 * std::max(1.0, std::abs(hi))) {
    const double pad = lo == 0 ? 0.5 : std::abs(lo) * 0.05;
    lo -= pad;
    hi += pad;
  }
  max_ticks = std::max(2, max_ticks);
  const double raw = (hi - lo) / double(max_ticks - 1);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = 10 * mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw * (1 - 1e-9)) {
      step = m * mag;
      break;
    }
  // Widen to whole steps; recompute with the next step if that needs too many ticks.
  for (;;) {
    const double a = std::floor(lo / step + 1e-9) * step, b = std::ceil(hi / step - 1e-9) * step;
    const int n = int(std::lround((b - a) / step)) + 1;
    if (n <= max_ticks) {
      t.lo = a;
      t.hi = b;
      t.step = step;
      for (int i = 0; i < n; ++i) {
        double v = a + step * double(i);
        if (std::abs(v) < step * 1e-9) v = 0;
        t.values.push_back(v);
      }
      return t;
    }
    const double m = step / std::pow(10.0, std::floor(std::log10(step) + 1e-9));
    step = (m < 1.5 ? 2 : m < 3 ? 5 : 10) * std::pow(10.0, std::floor(std::log10(step) + 1e-9));
  }
}

Ticks log_ticks(double lo, double hi) {
  Ticks t;
  if (!(lo > 0) || !(hi > 0)) lo = 1, hi = 10;
  if (lo > hi) std::swap(lo, hi);
  int a = int(std::floor(std::log10(lo) + 1e-9)), b = int(std::ceil(std::log10(hi) - 1e-9));
  if (b == a) ++b;
  t.lo = std::pow(10.0, a);
  t.hi = std::pow(10.0, b);
  t.step = 10;
  for (int e = a; e <= b; ++e) t.values.push_back(std::pow(10.0, e));
  return t;
}

std::string format_si(double v, int sig) {
  if (!std::isfinite(v)) return "–";
  static const char* suffix[] = {"", "k", "M", "G", "T", "P"};
  double a = std::abs(v);
  int i = 0;
  if (a >= 1e4)
    while (a >= 999.5 && i < 5) {
      a /= 1000;
      v /= 1000;
      ++i;
    }
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*g", sig, v);
  std::string s = buf;
  if (s.find('e') != std::string::npos) {  // %g chose an exponent: print fixed instead
    std::snprintf(buf, sizeof buf, "%.0f", v);
    s = buf;
  }
  return s + suffix[i];
}

std::string format_tick(double v, double step) {
  if (!std::isfinite(v)) return "–";
  if (std::abs(v) < std::abs(step) * 1e-9) v = 0;
  if (std::abs(step) >= 1e4 || (std::abs(v) >= 1e4 && std::abs(step) >= 1)) {
    // Large values: SI suffix with the decimals the step needs at that magnitude.
    static const char* suffix[] = {"", "k", "M", "G", "T", "P"};
    int i = 0;
    double scale = 1;
    while (std::abs(v) / scale >= 1000 && i < 5) scale *= 1000, ++i;
    if (v == 0)
      while (std::abs(step) / scale >= 1000 && i < 5) scale *= 1000, ++i;
    const double s = step / scale;
    const int dec = s >= 1 ? 0 : std::min(6, int(std::ceil(-std::log10(s) - 1e-9)));
    char buf[48];
    std::snprintf(buf, sizeof buf, "%.*f", dec, v / scale);
    return v == 0 ? "0" : std::string(buf) + suffix[i];
  }
  int dec = 0;
  if (step > 0 && step < 1) {
    // decimals so that step itself prints exactly (0.25 → 2, 0.05 → 2, 0.2 → 1)
    dec = int(std::ceil(-std::log10(step) - 1e-9));
    char buf[48];
    for (; dec < 10; ++dec) {
      std::snprintf(buf, sizeof buf, "%.*f", dec, step);
      if (std::abs(std::atof(buf) - step) < step * 1e-6) break;
    }
  }
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", dec, v);
  std::string s = buf;
  if (s.find_first_not_of("-0.") == std::string::npos) s = dec ? s.substr(s[0] == '-') : "0";
  return s;
}

std::string fmt_fixed(double v, int decimals) {
  if (!std::isfinite(v)) return "–";
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  std::string s = buf;
  if (s.find_first_not_of("-0.") == std::string::npos && s[0] == '-') s = s.substr(1);
  return s;
}

double Scale::operator()(double v) const {
  double a = d0, b = d1;
  if (log) {
    v = std::log10(std::max(v, 1e-300));
    a = std::log10(std::max(a, 1e-300));
    b = std::log10(std::max(b, 1e-300));
  }
  if (b == a) return (r0 + r1) / 2;
  return r0 + (v - a) / (b - a) * (r1 - r0);
}

std::string palette(size_t i) {
  static const char* colours[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7",
                                  "#E69F00", "#56B4E9", "#000000", "#999933"};
  return colours[i % 8];
}

std::string viridis(double t) {
  static const std::vector<std::array<int, 3>> a = {{68, 1, 84},    {71, 44, 122},  {59, 81, 139},
                                                    {44, 113, 142}, {33, 144, 141}, {39, 173, 129},
                                                    {92, 200, 99},  {170, 220, 50}, {253, 231, 37}};
  return interpolate(a, t);
}

std::string diverging(double t) {
  static const std::vector<std::array<int, 3>> a = {
      {33, 102, 172}, {103, 169, 207}, {209, 229, 240}, {247, 247, 247}, {253, 219, 199}, {239, 138, 98}, {178, 24, 43}};
  return interpolate(a, std::isfinite(t) ? (t + 1) / 2 : t);
}

double text_width(std::string_view s, double font_px) {
  // Helvetica advance widths, roughly: narrow letters 0.3 em, capitals/wide 0.7, others 0.55.
  double w = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if ((c & 0xC0) == 0x80) continue;  // UTF-8 continuation byte
    if (std::string_view("iljtf.,:;'|!I ()[]").find(char(c)) != std::string_view::npos) w += 0.3;
    else if (std::string_view("mwMW@%").find(char(c)) != std::string_view::npos) w += 0.85;
    else if (c >= 'A' && c <= 'Z') w += 0.68;
    else w += 0.56;
  }
  return w * font_px;
}

std::string render_line_plot(const LinePlot& p) {
  // Data ranges (finite points only; log axes ignore values <= 0).
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const auto& s : p.series)
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      if ((p.log_x && s.x[i] <= 0) || (p.log_y && s.y[i] <= 0)) continue;
      x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
    }
  for (const auto& h : p.hlines) y0 = std::min(y0, h.at), y1 = std::max(y1, h.at);
  if (!std::isfinite(x0)) x0 = 0, x1 = 1;
  if (!std::isfinite(y0)) y0 = 0, y1 = 1;
  if (std::isfinite(p.x_min)) x0 = p.x_min;
  if (std::isfinite(p.x_max)) x1 = p.x_max;
  if (std::isfinite(p.y_min)) y0 = p.y_min;
  if (std::isfinite(p.y_max)) y1 = p.y_max;
  Ticks xt = p.log_x ? log_ticks(x0, x1) : nice_ticks(x0, x1, std::max(3, int(p.width / 80)));
  Ticks yt = p.log_y ? log_ticks(y0, y1) : nice_ticks(y0, y1, std::max(3, int(p.height / 45)));
  // A fixed range is honoured exactly (ticks only inside it).
  auto clip_ticks = [](Ticks& t, double lo, double hi, bool fixed_lo, bool fixed_hi) {
    if (fixed_lo) t.lo = lo;
    if (fixed_hi) t.hi = hi;
    std::vector<double> kept;
    for (double v : t.values)
      if (v >= t.lo - 1e-12 * std::abs(t.step) && v <= t.hi + 1e-12 * std::abs(t.step)) kept.push_back(v);
    t.values = kept;
  };
  clip_ticks(xt, p.x_min, p.x_max, std::isfinite(p.x_min), std::isfinite(p.x_max));
  clip_ticks(yt, p.y_min, p.y_max, std::isfinite(p.y_min), std::isfinite(p.y_max));
  // The x axis of a curve is tight to the data when the ticks would add > 8 % empty space.
  if (!p.log_x && !std::isfinite(p.x_min) && (x0 - xt.lo) > 0.08 * (xt.hi - xt.lo)) clip_ticks(xt, x0, 0, true, false);
  if (!p.log_x && !std::isfinite(p.x_max) && (xt.hi - x1) > 0.08 * (xt.hi - xt.lo)) clip_ticks(xt, 0, x1, false, true);

  std::vector<LegendItem> items;
  for (size_t i = 0; i < p.series.size(); ++i)
    if (!p.series[i].name.empty())
      items.push_back({p.series[i].name, p.series[i].color.empty() ? palette(i) : p.series[i].color,
                       p.series[i].dashed});
  const double lw = p.legend ? legend_width(items) : 0;
  double ylab_w = 0;
  for (double v : yt.values) ylab_w = std::max(ylab_w, text_width(p.log_y ? format_si(v) : format_tick(v, yt.step), kFont));
  Box b{ylab_w + 30, p.title.empty() ? 12.0 : 30.0, p.width - 14 - (lw > 0 ? lw + 6 : 0), p.height - 40};
  Scale xs{xt.lo, xt.hi, b.left, b.right, p.log_x};
  Scale ys{yt.lo, yt.hi, b.bottom, b.top, p.log_y};

  std::string s = open_svg(p.width, p.height, p.title);
  s += y_axis(b, ys, yt, p.y_label, p.log_y);
  s += x_axis(b, xs, xt, p.x_label, p.log_x);
  const std::string clip = next_id("clip");
  s += "<clipPath id=\"" + clip + "\"><rect x=\"" + num(b.left) + "\" y=\"" + num(b.top - 1) + "\" width=\"" +
       num(b.w()) + "\" height=\"" + num(b.h() + 2) + "\"/></clipPath>";
  for (const auto& h : p.hlines) {
    const double y = ys(h.at);
    if (y < b.top - 0.5 || y > b.bottom + 0.5) continue;
    s += "<line x1=\"" + num(b.left) + "\" x2=\"" + num(b.right) + "\" y1=\"" + num(y) + "\" y2=\"" + num(y) +
         "\" stroke=\"" + h.color + "\" stroke-dasharray=\"2 3\"/>";
    if (!h.label.empty()) s += text(b.right - 3, y - 4, h.label, "end", 10, " fill-opacity=\"0.8\"");
  }
  for (const auto& v : p.vlines) {
    const double x = xs(v.at);
    if (x < b.left - 0.5 || x > b.right + 0.5) continue;
    s += "<line x1=\"" + num(x) + "\" x2=\"" + num(x) + "\" y1=\"" + num(b.top) + "\" y2=\"" + num(b.bottom) +
         "\" stroke=\"" + v.color + "\" stroke-dasharray=\"4 3\"/>";
    if (!v.label.empty()) s += text(x + 3, b.top + 11, v.label, "start", 10);
  }
  s += "<g clip-path=\"url(#" + clip + ")\">";
  for (size_t si = 0; si < p.series.size(); ++si) {
    const auto& ser = p.series[si];
    const std::string color = ser.color.empty() ? palette(si) : ser.color;
    const size_t n = std::min(ser.x.size(), ser.y.size());
    if (ser.line) {
      std::string d;
      bool pen = false;
      for (size_t i = 0; i < n; ++i) {
        const bool ok = std::isfinite(ser.x[i]) && std::isfinite(ser.y[i]) && !(p.log_x && ser.x[i] <= 0) &&
                        !(p.log_y && ser.y[i] <= 0);
        if (!ok) {
          pen = false;
          continue;
        }
        d += (pen ? "L" : "M") + num(xs(ser.x[i])) + " " + num(ys(ser.y[i]));
        pen = true;
      }
      if (!d.empty())
        s += "<path class=\"series\" d=\"" + d + "\" fill=\"none\" stroke=\"" + color + "\" stroke-width=\"" +
             num(ser.width) + "\" stroke-linejoin=\"round\"" + (ser.dashed ? " stroke-dasharray=\"6 4\"" : "") + "/>";
    }
    if (ser.markers || !ser.line)
      for (size_t i = 0; i < n; ++i)
        if (std::isfinite(ser.x[i]) && std::isfinite(ser.y[i]))
          s += "<circle class=\"point\" cx=\"" + num(xs(ser.x[i])) + "\" cy=\"" + num(ys(ser.y[i])) + "\" r=\"" +
               (ser.line ? "2.5" : "4.5") + "\" fill=\"" + color + "\" stroke=\"#fff\" stroke-width=\"0.8\"/>";
  }
  s += "</g>";
  if (lw > 0) s += legend(b.right + 14, b.top + 8, items);
  return s + "</svg>";
}

std::string render_bar_chart(const BarChart& c) {
  double lo = 0, hi = 0;
  for (const auto& s : c.series) finite_range(s.values, lo, hi);
  for (const auto& h : c.hlines) lo = std::min(lo, h.at), hi = std::max(hi, h.at);
  const double span = hi - lo > 0 ? hi - lo : 1;
  if (c.value_labels) {  // head-room for the labels
    if (hi > 0) hi += 0.08 * span;
    if (lo < 0) lo -= 0.08 * span;
  }
  Ticks yt = nice_ticks(lo, hi, std::max(3, int(c.height / 45)));
  std::vector<LegendItem> items;
  for (size_t i = 0; i < c.series.size(); ++i)
    items.push_back({c.series[i].name, c.series[i].color.empty() ? palette(i) : c.series[i].color, false, true});
  const double lw = c.legend && c.series.size() > 1 ? legend_width(items) : 0;
  // Category labels: '\n' splits lines.
  size_t label_lines = 1;
  for (const auto& cat : c.categories) label_lines = std::max(label_lines, size_t(std::count(cat.begin(), cat.end(), '\n')) + 1);
  double ylab_w = 0;
  for (double v : yt.values) ylab_w = std::max(ylab_w, text_width(format_tick(v, yt.step), kFont));
  Box b{ylab_w + 30, c.title.empty() ? 12.0 : 30.0, c.width - 14 - (lw > 0 ? lw + 6 : 0),
        c.height - 14 - 13 * double(label_lines)};
  Scale ys{yt.lo, yt.hi, b.bottom, b.top};
  std::string s = open_svg(c.width, c.height, c.title);
  // Grid and y axis; the x axis is the zero line.
  for (double v : yt.values) {
    const double y = ys(v);
    s += "<line x1=\"" + num(b.left) + "\" x2=\"" + num(b.right) + "\" y1=\"" + num(y) + "\" y2=\"" + num(y) +
         "\" stroke=\"" + kGrid + "\"/>";
    s += text(b.left - 5, y + 3.5, format_tick(v, yt.step), "end");
  }
  s += "<line x1=\"" + num(b.left) + "\" x2=\"" + num(b.left) + "\" y1=\"" + num(b.top) + "\" y2=\"" + num(b.bottom) +
       "\" stroke=\"" + kAxis + "\"/>";
  if (!c.y_label.empty()) {
    const double cx = 12, cy = (b.top + b.bottom) / 2;
    s += text(cx, cy, c.y_label, "middle", kFont, " transform=\"rotate(-90 " + num(cx) + " " + num(cy) + ")\"");
  }
  const size_t nc = std::max<size_t>(1, c.categories.size()), ns = std::max<size_t>(1, c.series.size());
  const double group_w = b.w() / double(nc);
  const double bar_w = std::min(42.0, group_w * 0.8 / double(ns));
  const double y_zero = ys(0);
  for (size_t ci = 0; ci < c.categories.size(); ++ci) {
    const double gx = b.left + group_w * (double(ci) + 0.5);
    for (size_t si = 0; si < c.series.size(); ++si) {
      const auto& ser = c.series[si];
      if (ci >= ser.values.size() || !std::isfinite(ser.values[ci])) continue;
      const double v = ser.values[ci];
      const double x = gx - bar_w * double(ns) / 2 + bar_w * double(si);
      const double y = ys(v);
      const double top = std::min(y, y_zero), h = std::max(0.5, std::abs(y - y_zero));
      s += "<rect class=\"bar\" x=\"" + num(x + 1) + "\" y=\"" + num(top) + "\" width=\"" + num(bar_w - 2) +
           "\" height=\"" + num(h) + "\" fill=\"" + (ser.color.empty() ? palette(si) : ser.color) + "\"><title>" +
           xml_escape(ser.name + " · " + c.categories[ci] + ": " + fmt_fixed(v, c.value_decimals)) + "</title></rect>";
      if (c.value_labels)
        s += text(x + bar_w / 2, v >= 0 ? top - 3 : top + h + 10, fmt_fixed(v, c.value_decimals), "middle",
                  bar_w < 22 ? 8 : 9.5);
    }
    // Category label, one <tspan> per line.
    std::string lines = "<text x=\"" + num(gx) + "\" y=\"" + num(b.bottom + 14) + "\" font-size=\"" + num(kFont) +
                        "\" text-anchor=\"middle\" fill=\"" + kText + "\">";
    std::stringstream ss(c.categories[ci]);
    std::string line;
    for (int li = 0; std::getline(ss, line, '\n'); ++li)
      lines += "<tspan x=\"" + num(gx) + "\" dy=\"" + (li == 0 ? "0" : "13") + "\">" + xml_escape(line) + "</tspan>";
    s += lines + "</text>";
  }
  s += "<line x1=\"" + num(b.left) + "\" x2=\"" + num(b.right) + "\" y1=\"" + num(y_zero) + "\" y2=\"" + num(y_zero) +
       "\" stroke=\"" + kAxis + "\"/>";
  for (const auto& h : c.hlines) {
    const double y = ys(h.at);
    s += "<line x1=\"" + num(b.left) + "\" x2=\"" + num(b.right) + "\" y1=\"" + num(y) + "\" y2=\"" + num(y) +
         "\" stroke=\"" + h.color + "\" stroke-dasharray=\"4 3\"/>";
    if (!h.label.empty()) s += text(b.right - 3, y - 4, h.label, "end", 10);
  }
  if (lw > 0) s += legend(b.right + 14, b.top + 8, items);
  return s + "</svg>";
}

std::string render_heatmap(const Heatmap& h) {
  double lo = INFINITY, hi = -INFINITY;
  for (const auto& row : h.values) finite_range(row, lo, hi);
  if (!std::isfinite(lo)) lo = 0, hi = 1;
  if (std::isfinite(h.vmin)) lo = h.vmin;
  if (std::isfinite(h.vmax)) hi = h.vmax;
  if (h.diverging) {
    const double m = std::max({std::abs(lo), std::abs(hi), 1e-12});
    lo = -m, hi = m;
  }
  if (hi <= lo) hi = lo + 1;
  double row_w = 0;
  for (const auto& r : h.row_labels) row_w = std::max(row_w, text_width(r, kFont));
  const double left = row_w + (h.y_label.empty() ? 12 : 30);
  const double cb_w = 64;  // colour bar and its labels
  Box b{left, h.title.empty() ? 10.0 : 28.0, h.width - cb_w - 8, h.height - (h.x_label.empty() ? 22 : 38)};
  const size_t nr = h.values.size();
  size_t ncol = 0;
  for (const auto& r : h.values) ncol = std::max(ncol, r.size());
  std::string s = open_svg(h.width, h.height, h.title);
  if (nr == 0 || ncol == 0) return s + text(b.left, b.top + 20, "(no data)") + "</svg>";
  const double cw = b.w() / double(ncol), ch = b.h() / double(nr);
  auto colour = [&](double v) {
    return h.diverging ? diverging(v / hi) : viridis((v - lo) / (hi - lo));
  };
  for (size_t r = 0; r < nr; ++r) {
    for (size_t c = 0; c < h.values[r].size(); ++c) {
      const double v = h.values[r][c];
      const double x = b.left + cw * double(c), y = b.top + ch * double(r);
      s += "<rect class=\"cell\" x=\"" + num(x) + "\" y=\"" + num(y) + "\" width=\"" + num(cw + 0.3) + "\" height=\"" +
           num(ch + 0.3) + "\" fill=\"" + colour(v) + "\"><title>" +
           xml_escape((r < h.row_labels.size() ? h.row_labels[r] : "") + " · " +
                      (c < h.col_labels.size() ? h.col_labels[c] : "") + ": " + fmt_fixed(v, h.decimals + 1)) +
           "</title></rect>";
      if (h.annotate && cw > 22 && ch > 12) {
        const double t = h.diverging ? std::abs(v / hi) : (v - lo) / (hi - lo);
        const bool dark = h.diverging ? t > 0.6 : t < 0.55;
        s += "<text x=\"" + num(x + cw / 2) + "\" y=\"" + num(y + ch / 2 + 3.5) +
             "\" font-size=\"9\" text-anchor=\"middle\" fill=\"" + (dark ? "#fff" : "#111") + "\">" +
             fmt_fixed(v, h.decimals) + "</text>";
      }
    }
    if (r < h.row_labels.size()) s += text(b.left - 5, b.top + ch * (double(r) + 0.5) + 3.5, h.row_labels[r], "end");
  }
  // Column labels: every one when they fit, else every n-th.
  double col_w = 0;
  for (const auto& c : h.col_labels) col_w = std::max(col_w, text_width(c, kFont) + 4);
  const size_t every = col_w > cw ? size_t(std::ceil(col_w / cw)) : 1;
  for (size_t c = 0; c < h.col_labels.size() && c < ncol; c += every)
    s += text(b.left + cw * (double(c) + 0.5), b.bottom + 14, h.col_labels[c], "middle");
  if (!h.x_label.empty()) s += text((b.left + b.right) / 2, b.bottom + 30, h.x_label, "middle");
  if (!h.y_label.empty()) {
    const double cx = 12, cy = (b.top + b.bottom) / 2;
    s += text(cx, cy, h.y_label, "middle", kFont, " transform=\"rotate(-90 " + num(cx) + " " + num(cy) + ")\"");
  }
  // Colour bar: 20 steps, labelled at its ends and middle.
  const double bx = b.right + 12, bw = 12;
  for (int i = 0; i < 20; ++i) {
    const double v = hi - (hi - lo) * (double(i) + 0.5) / 20;
    s += "<rect x=\"" + num(bx) + "\" y=\"" + num(b.top + b.h() * double(i) / 20) + "\" width=\"" + num(bw) +
         "\" height=\"" + num(b.h() / 20 + 0.3) + "\" fill=\"" + colour(v) + "\"/>";
  }
  const Ticks ct = nice_ticks(lo, hi, 3);
  for (double v : {hi, (lo + hi) / 2, lo})
    s += text(bx + bw + 4, b.top + b.h() * (hi - v) / (hi - lo) + 3.5, format_tick(v, ct.step / 10), "start", 10);
  if (!h.colorbar_label.empty()) {
    const double cx = h.width - 6, cy = (b.top + b.bottom) / 2;
    s += text(cx, cy, h.colorbar_label, "middle", 10, " transform=\"rotate(-90 " + num(cx) + " " + num(cy) + ")\"");
  }
  return s + "</svg>";
}

}  // namespace moecpt::report
