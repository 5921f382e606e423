// The SVG plotting pieces against hand-computed values: ticks, tick labels,
// scaling, escaping, colours, and the element counts of rendered plots.
#include <gtest/gtest.h>

#include <regex>

#include "report/svg.h"

namespace moecpt::report {
namespace {

Series series(std::string name, std::vector<double> x, std::vector<double> y) {
  Series s;
  s.name = std::move(name);
  s.x = std::move(x);
  s.y = std::move(y);
  return s;
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

TEST(ReportSvg, NiceTicksHandValues) {
  // raw step 1/5 = 0.2 → step 0.2, six ticks.
  auto t = nice_ticks(0, 1, 6);
  EXPECT_DOUBLE_EQ(t.step, 0.2);
  ASSERT_EQ(t.values.size(), 6u);
  EXPECT_DOUBLE_EQ(t.values.front(), 0);
  EXPECT_NEAR(t.values.back(), 1.0, 1e-12);
  // raw 6.5/4 = 1.625 → step 2, widened to [2, 10].
  t = nice_ticks(3.2, 9.7, 5);
  EXPECT_DOUBLE_EQ(t.step, 2);
  EXPECT_EQ(t.values, (std::vector<double>{2, 4, 6, 8, 10}));
  // raw 0.05 → [-0.15, 0.1] needs 6 ticks > 5, so the next step 0.1: [-0.2, 0.1].
  t = nice_ticks(-0.13, 0.07, 5);
  EXPECT_NEAR(t.step, 0.1, 1e-15);
  ASSERT_EQ(t.values.size(), 4u);
  EXPECT_NEAR(t.values[0], -0.2, 1e-12);
  EXPECT_EQ(t.values[2], 0.0);  // exactly zero, not 1e-17
  // A single value gets a unit-sized range around it: [-0.5, 0.5] with step 0.5.
  t = nice_ticks(0, 0, 5);
  EXPECT_EQ(t.values, (std::vector<double>{-0.5, 0, 0.5}));
  // Reversed bounds are accepted.
  EXPECT_EQ(nice_ticks(10, 0, 3).values, (std::vector<double>{0, 5, 10}));
}

TEST(ReportSvg, LogTicksAreDecades) {
  auto t = log_ticks(3e9, 2e12);
  EXPECT_EQ(t.values.size(), 5u);  // 1e9 … 1e13
  EXPECT_DOUBLE_EQ(t.lo, 1e9);
  EXPECT_DOUBLE_EQ(t.hi, 1e13);
}

TEST(ReportSvg, TickAndNumberFormatting) {
  EXPECT_EQ(format_tick(0.25, 0.05), "0.25");
  EXPECT_EQ(format_tick(0.2, 0.2), "0.2");
  EXPECT_EQ(format_tick(50, 10), "50");
  EXPECT_EQ(format_tick(-1e-17, 0.1), "0.0");
  EXPECT_EQ(format_tick(2500, 500), "2500");
  EXPECT_EQ(format_tick(12000, 2000), "12k");
  EXPECT_EQ(format_tick(1.5e9, 5e8), "1.5G");
  EXPECT_EQ(format_si(1234), "1234");
  EXPECT_EQ(format_si(123456), "123k");
  EXPECT_EQ(format_si(2.5e12), "2.5T");
  EXPECT_EQ(format_si(999999), "1M");
  EXPECT_EQ(fmt_fixed(0.0412, 3), "0.041");
  EXPECT_EQ(fmt_fixed(-0.0001, 2), "0.00");
  EXPECT_EQ(fmt_fixed(kNaN, 2), "–");
}

TEST(ReportSvg, ScalesMapLinearlyAndLogarithmically) {
  EXPECT_DOUBLE_EQ((Scale{0, 10, 50, 150})(2.5), 75);
  EXPECT_DOUBLE_EQ((Scale{0, 1, 200, 0})(0.25), 150);  // y axes grow upwards
  EXPECT_DOUBLE_EQ((Scale{1, 100, 0, 100, true})(10), 50);
  EXPECT_DOUBLE_EQ((Scale{3, 3, 0, 100})(3), 50);  // degenerate domain: the middle
}

TEST(ReportSvg, EscapingAndColours) {
  EXPECT_EQ(xml_escape("a<b & \"c\"'"), "a&lt;b &amp; &quot;c&quot;&#39;");
  EXPECT_EQ(viridis(0), "#440154");
  EXPECT_EQ(viridis(1), "#fde725");
  EXPECT_EQ(viridis(2), "#fde725");  // clamped
  EXPECT_EQ(diverging(0), "#f7f7f7");
  EXPECT_EQ(palette(0), palette(8));
}

TEST(ReportSvg, LinePlotHasOnePathPerSeriesAndBreaksAtNaN) {
  LinePlot p;
  p.title = "loss <en>";
  p.x_label = "tokens (M)";
  p.y_label = "loss (nats/token)";
  p.series.push_back(series("a & b", {0, 1, 2, 3}, {4, 3, kNaN, 2}));
  p.series.push_back(series("c", {0, 3}, {1, 1}));
  p.vlines.push_back({1.5, "shift"});
  const auto svg = render_line_plot(p);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_EQ(count(svg, "<path class=\"series\""), 2u);
  EXPECT_NE(svg.find("loss &lt;en&gt;"), std::string::npos);
  EXPECT_NE(svg.find("a &amp; b"), std::string::npos);
  // The NaN splits the first series into two sub-paths.
  std::smatch m;
  ASSERT_TRUE(std::regex_search(svg, m, std::regex("<path class=\"series\" d=\"([^\"]*)\"")));
  EXPECT_EQ(count(m[1].str(), "M"), 2u);
  EXPECT_EQ(count(svg, "tokens (M)"), 1u);
  EXPECT_EQ(svg.find("nan"), std::string::npos);
}

TEST(ReportSvg, LinePlotPlacesPointsOnTheScale) {
  // A single series from (0,0) to (10,1): its path starts at the plot's
  // bottom-left corner and ends at the top-right one, which the axis lines share.
  LinePlot p;
  p.series.push_back(series("", {0, 10}, {0, 1}));
  p.legend = false;
  const auto svg = render_line_plot(p);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(svg, m, std::regex("d=\"M([0-9.]+) ([0-9.]+)L([0-9.]+) ([0-9.]+)\"")));
  const double x0 = std::stod(m[1]), y0 = std::stod(m[2]), x1 = std::stod(m[3]), y1 = std::stod(m[4]);
  EXPECT_LT(x0, x1);
  EXPECT_GT(y0, y1);
  // The y axis line is drawn at x0 from the top of the plot (y1) to its bottom (y0).
  char axis[128];
  std::snprintf(axis, sizeof axis, "x1=\"%s\" x2=\"%s\" y1=\"%s\" y2=\"%s\"", m[1].str().c_str(), m[1].str().c_str(),
                m[4].str().c_str(), m[2].str().c_str());
  EXPECT_NE(svg.find(axis), std::string::npos) << svg;
}

TEST(ReportSvg, BarChartAndHeatmapElementCounts) {
  BarChart b;
  b.categories = {"Dense", "Switch\nZ+Aux"};
  b.series = {{"r=0", {0.1, -0.05}, ""}, {"r=0.4", {0.02, kNaN}, ""}};
  const auto bs = render_bar_chart(b);
  EXPECT_EQ(count(bs, "<rect class=\"bar\""), 3u);  // the NaN has no bar
  EXPECT_EQ(count(bs, "<tspan"), 3u);                // "Switch" / "Z+Aux" on two lines
  EXPECT_NE(bs.find(">-0.050<"), std::string::npos);

  Heatmap h;
  h.values = {{0.1, 0.2, 0.7}, {0.3, 0.3, 0.4}};
  h.row_labels = {"L0", "L1"};
  h.col_labels = {"0", "1", "2"};
  const auto hs = render_heatmap(h);
  EXPECT_EQ(count(hs, "<rect class=\"cell\""), 6u);
  // vmin/vmax from the data: the largest cell is the top of viridis.
  EXPECT_NE(hs.find("fill=\"#fde725\"><title>L0 · 2"), std::string::npos);
}

}  // namespace
}  // namespace moecpt::report
