// The study report: one self-contained HTML file (inline SVG from
// report/svg.h, inline CSS, no scripts, no network) with one section per
// research question of the paper, each with its plots and a one-line verdict
// computed from the saved results (report/results.h).
#pragma once
#include <string>
#include <vector>

#include "report/results.h"

namespace moecpt::report {

struct Finding {
  int id = 0;             // 1–7: SPEC §6's findings
  std::string question;   // the research question, one line
  std::string verdict;    // computed from the numbers; says so when the scale shows no effect
  bool available = true;  // false: the arms it needs are not in this study
};

// The seven findings of SPEC §6, each judged on this study's numbers.
std::vector<Finding> compute_findings(const StudyResults& r);

// The whole report.html.
std::string render_report(const StudyResults& r);

// The findings as plain text on stdout (end of `moecpt study`).
void print_findings(const StudyResults& r);

}  // namespace moecpt::report
