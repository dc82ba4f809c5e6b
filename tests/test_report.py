"""The audit report: what a vendor manager reads, in Markdown and as one self-contained HTML page."""

import io
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ml.report import (
    BLANK_BELOW, build_report, confusion_colours, confusion_plot, likely_errors, load_issue_images, read_quarantine,
    write_report, write_section,
)
from ml.thumbnails import contact_sheet, thumbnail_png

CLASSES = ("cat", "dog", "bird", "fish")
VENDORS = ["a", "b", "c"]


def _scorecard() -> pd.DataFrame:
    return pd.DataFrame({
        "vendor": ["a", "b", "c"], "n_images": [400, 380, 12], "n_flagged": [3, 41, 1], "n_ambiguous": [2, 5, 0],
        "error_rate": [0.0123, 0.1049, 0.0833], "error_rate_low": [0.0041, 0.0752, 0.0],
        "error_rate_high": [0.0245, 0.1368, 0.3333], "rank": [1, 2, None],
        "status": ["rated", "rated", "too few images to rate"], "note": ["", "", "only 12 images delivered"],
        "ambiguous_rate": [0.005, 0.0132, 0.0], "cleanlab_error_rate": [0.061, 0.1421, 0.0833],
        "dataset_version": "3f2a9c", "model_version": "4",
    })


def _comparisons(significant: bool = True) -> pd.DataFrame:
    return pd.DataFrame({
        "vendor_a": ["a", "a", "b"], "vendor_b": ["b", "c", "c"],
        "difference": [-0.0926, -0.071, 0.0216], "difference_low": [-0.1251, -0.32, -0.23],
        "difference_high": [-0.0611, 0.02, 0.1],
        "p_value": [0.0049, None, None] if significant else [0.2, None, None],
        "p_holm": [0.0098, None, None] if significant else [0.4, None, None],
        "p_text": ["0.0098" if significant else "0.40", "", ""],
        "conclusion": ["a has fewer errors than b" if significant else "not distinguishable with this data",
                       "not compared: too few images to rate c", "not compared: too few images to rate c"],
    })


def _issues() -> pd.DataFrame:
    rows = []
    for vendor, n, n_error in (("a", 400, 3), ("b", 380, 41), ("c", 12, 1)):
        for i in range(n):
            error = i < n_error
            # b confuses dogs it labels "cat" most, then fish labelled "bird"
            given, suggested = ("cat", "dog") if (vendor != "b" or i % 3) else ("bird", "fish")
            rows.append({"image_id": f"{vendor}/batch-1/images/{i:04d}.png", "vendor": vendor, "batch": "batch-1",
                         "given_label": given if error else "cat", "suggested_label": suggested if error else "cat",
                         "p_error": f"{0.99 - i / 1000:.4f}" if error else "0.0100",
                         "verdict": "error" if error else "ok", "model_version": "4", "model_trained_on": "3f2a9c",
                         "prediction": "out-of-fold", "cleanlab_flag": str(error), "duplicate_of": ""})
    issues = pd.DataFrame(rows)
    # b's image 0100 is a's image 0007 delivered again
    issues.loc[issues["image_id"] == "b/batch-1/images/0100.png", "duplicate_of"] = "a/batch-1/images/0007.png"
    return issues


def _quarantined() -> pd.DataFrame:
    reasons = ["image file not found"] * 30 + ["unknown class"] * 8 + ["empty label"] * 2
    return pd.DataFrame({"vendor": "b", "batch": "batch-1", "row": range(2, 42), "image": "x.png", "label": "cat",
                         "reason": reasons})


def _confusion() -> np.ndarray:
    k = len(CLASSES)
    confusion = np.tile(np.eye(k), (3, 1, 1))
    confusion[1, 1] = [0.17, 0.80, 0.02, 0.01]  # dogs labelled cat 17%, bird 2%, fish 1%
    confusion[1, 3] = [0.002, 0.0, 0.03, 0.968]  # fish labelled cat 0.2%, bird 3%
    return confusion


def _images(issues: pd.DataFrame, channels: int = 1) -> dict:
    rng = np.random.default_rng(0)
    return {i: rng.integers(0, 256, (8, 8, channels), dtype=np.uint8) for i in likely_errors(issues)["image_id"]}


def _report(significant: bool = True, annotators=None, card=None):
    issues = _issues()
    return build_report(_scorecard() if card is None else card, _comparisons(significant), issues, _confusion(), VENDORS, CLASSES,
                        {"dataset_version": "3f2a9c", "model": "vendor-audit-classifier v4", "head": "softmax",
                         "mlflow_run": "0123abcd", "generated_at": "2026-01-02 03:04 UTC"},
                        images=_images(issues), quarantined=_quarantined(), quarantine_warn_share=0.05, n_boot=200,
                        annotators=annotators)


def _section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_summary_comes_first_and_names_the_best_vendor_only_when_a_comparison_says_so():
    markdown = _report().markdown
    headings = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert headings[0] == "Summary"
    assert markdown.index("## Summary") < markdown.index("## Vendors")
    summary = _section(markdown, "Summary")
    assert "**a is the best vendor**: an estimated 1.2% (0.4-2.5%, model only) of its labels are wrong" in summary
    assert "**b has more errors**: an estimated 10.5% (7.5-13.7%, model only), 9.3 percentage points more than a " \
           "(95% interval 6.1 to 12.5, p = 0.0098)" in summary
    assert "**c** delivered 12 images: too few images to rate" in summary
    assert "Holm correction" in summary
    # checking flagged images confirms errors; only a plan measures the rate, and the advice says so
    assert "To confirm errors to take up with b, check its 41 flagged images, most likely first. Those answers " \
           "set the images' verdicts but do not change the rate" in summary
    assert "draw a check plan: vendor-audit plan --budget N picks N images per vendor at random" in summary
    assert "Collect more images from c" in summary

    undecided = _section(_report(significant=False).markdown, "Summary")
    assert "best vendor" not in undecided and "more errors" not in undecided and "b, check its" not in undecided
    assert "No vendor is clearly best. **a** has the lowest estimate (1.2% (0.4-2.5%, model only)), but it is not " \
           "distinguishable from b with this data." in undecided
    assert "**b and a are not distinguishable with this data**" in undecided


def test_rates_are_percentages_with_intervals_under_plain_headers():
    report = _report()
    table = _section(report.markdown, "Vendors")
    assert ("| Vendor | Images | Likely errors | Ambiguous (not billed) | Estimated error rate (95% interval) "
            "| Rank | Status |") in table
    assert "| a | 400 | 3 | 2 | 1.2% (0.4-2.5%) | 1 | rated |" in table
    assert "| c | 12 | 1 | 0 | 8.3% (0.0-33.3%) | - | too few images to rate (see warnings) |" in table
    pairwise = _section(report.markdown, "Pairwise comparisons")
    assert "| a vs b | a has fewer errors than b | b 9.3 points higher (95% interval 6.1 to 12.5) | 0.0098 |" \
        in pairwise
    assert "| a vs c | not compared: too few images to rate c |" in pairwise and "not tested" in pairwise
    # no raw fractions anywhere: every rate is a percentage; the only long decimal is a p-value
    for text in (report.markdown, report.html):
        before_provenance = text.split("## Provenance")[0].split("<h2>Provenance")[0]
        assert set(re.findall(r"(?<![\d.])0\.\d{3,}", before_provenance)) == {"0.0098"}


def test_confusions_duplicates_input_problems_baseline_and_provenance():
    report = _report()
    markdown = report.markdown
    confused = _section(markdown, "Classes each vendor confuses most")
    assert "| b | labels dog as cat: 27 images | labels fish as bird: 14 images | - |" in confused
    assert "| a | labels dog as cat: 3 images | - | - |" in confused
    # the explanation's example is the audit's own most frequent confusion, in the home's class names
    assert '"labels dog as cat" means images that are probably dog were labelled cat.' in confused
    duplicates = _section(markdown, "Images delivered more than once")
    assert "| b | a | 1 | b/batch-1/images/0100.png (first: a/batch-1/images/0007.png) |" in duplicates
    problems = _section(markdown, "Input problems")
    assert "| b/batch-1 | 420 | 40 | 9.5% | image file not found: 30; unknown class: 8; empty label: 2 |" in problems
    assert "- **c**: only 12 images delivered" in problems
    assert "Ask b to fix and redeliver the rejected rows of batch-1" in _section(markdown, "Summary")
    baseline = _section(markdown, "Baseline: cleanlab")
    assert "| a | 1.2% (0.4-2.5%) | 6.1% |" in baseline
    assert "low self-confidence" in baseline and "no interval" in baseline
    assert "**Use our estimate for decisions**" in baseline
    headings = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert headings[-1] == "Provenance" and headings.index("Baseline: cleanlab") == len(headings) - 2
    assert "| MLflow run | 0123abcd |" in _section(markdown, "Provenance")
    assert "0123abcd" not in markdown.split("## Provenance")[0]  # no hashes before the provenance
    assert "Annotators within each vendor" not in markdown


def test_a_delivery_rejected_whole_is_reported_as_such():
    whole = pd.DataFrame([{"vendor": "a", "batch": "batch-9", "row": 0, "image": "", "label": "",
                           "reason": "labels.csv: missing column 'label'"}])
    issues = _issues()
    markdown = build_report(_scorecard(), _comparisons(), issues, _confusion(), VENDORS, CLASSES, {},
                            images=_images(issues), quarantined=pd.concat([_quarantined(), whole]),
                            quarantine_warn_share=0.05, n_boot=200).markdown
    assert "**a/batch-9**: the whole delivery was rejected (labels.csv: missing column 'label')." in markdown
    assert "Ask a to fix and redeliver batch-9 under a new batch name." in markdown
    assert "| a/batch-9 | - | whole delivery | 100.0% | labels.csv: missing column 'label': 1 |" in markdown


def test_a_lone_vendor_is_reported_as_an_upper_estimate_with_no_comparison_promised():
    from ml.scorecard import UPPER_ONLY_NOTE

    card = _scorecard().iloc[:1].assign(error_rate_low=0.0, note=UPPER_ONLY_NOTE)
    issues = _issues().query("vendor == 'a'")
    no_pairs = _comparisons().iloc[:0]
    markdown = build_report(card, no_pairs, issues, _confusion()[:1], ["a"], CLASSES, {}, images=_images(issues),
                            quarantined=_quarantined().iloc[:0], quarantine_warn_share=0.05, n_boot=200).markdown
    summary = _section(markdown, "Summary")
    assert "**a** is the only vendor with enough images to rate: at most 2.5% of its labels are wrong" in summary
    assert "an upper estimate" in summary and "Holm" not in summary  # no comparison to correct for


def test_model_only_figures_say_so_and_how_many_checks_would_make_them_check_based():
    from ml.contract import vendor_limits, with_contract

    summary = _section(_report().markdown, "Summary")
    caveat = ("Model-only figures count the errors the classifier can see; errors it cannot see (for example labels "
              "copied from a similar model, or errors on genuinely hard images) are not ruled out until hand checks "
              "are combined.")
    assert f"\n\n{caveat}\n\nHow sure:" in summary  # its own paragraph, right after the findings
    # no contract: MIN_CHECKS_FOR_NORMAL per rated vendor; c, too small to rate, is asked for images instead
    for vendor in ("a", "b"):
        assert (f"- {vendor}: about 100 planned checks, once answered, would make its verdict check-based: "
                f"vendor-audit plan --budget 100\n") in summary
    assert "- c: about" not in summary and "Collect more images from c" in summary
    # with a contract, an undecided vendor is asked for the checks most likely to decide it
    card = with_contract(_scorecard(), vendor_limits(VENDORS, 0.1, {}), _issues().assign(verdict="ok"), [])
    b_checks = int(card.set_index("vendor").at["b", "checks_to_decide"])  # b: 10.5% (7.5-13.7%) around 10%
    assert b_checks != 100
    summary = _section(_report(card=card).markdown, "Summary")
    assert (f"- b: about {b_checks:,} planned checks, once answered, would make its verdict check-based: "
            f"vendor-audit plan --budget {b_checks}\n") in summary
    assert "- a: about 100 planned checks" in summary  # within its limit: no count to decide, the default


class _Page(HTMLParser):
    """Collects image sources and headings, and checks that every opened element is closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.sources, self.h2, self.problems, self._in_h2 = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
        if tag == "h2":
            self._in_h2 = True
            self.h2.append("")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(tag)

    def handle_data(self, data):
        if self._in_h2:
            self.h2[-1] += data


def test_html_is_self_contained_and_parses_with_every_image_inline():
    report = _report()
    page = report.html
    assert 'src="http' not in page and 'src="plots/' not in page and 'src="thumbs/' not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.problems == [] and parser.stack == []
    assert parser.h2[0] == "Summary" and parser.h2[-1] == "Provenance"
    # 3 confusion plots, and the top errors: 3 of a, 6 of b, 1 of c
    assert len(parser.sources) == 3 + 3 + 6 + 1
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(__import__("base64").b64decode(source.split(",", 1)[1]))).verify()
    assert "given cat → likely dog" in page and "p_error 0.99" in page


def test_markdown_links_the_files_the_report_returns_and_they_decode():
    report = _report()
    assert sorted(p for p in report.files if p.startswith("plots/")) == [f"plots/confusion-{v}.png" for v in VENDORS]
    thumbs = sorted(p for p in report.files if p.startswith("thumbs/"))
    assert len(thumbs) == 10 and "thumbs/b-6.png" in thumbs and "thumbs/b-7.png" not in thumbs
    for path, data in report.files.items():
        assert f"]({path})" in report.markdown
        image = Image.open(io.BytesIO(data))
        image.load()
        if path.startswith("thumbs/"):
            assert image.size == (96, 96) and image.mode == "L"  # 8x8 upscaled 12 times, nearest neighbour


def test_thumbnails_upscale_with_nearest_neighbour_grey_or_rgb():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    image = Image.open(io.BytesIO(thumbnail_png(grey)))
    assert image.size == (96, 96) and image.mode == "L"
    assert np.array_equal(np.asarray(image)[::12, ::12], grey[:, :, 0])  # every pixel a crisp 12x12 block
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[..., 0] = 200
    image = Image.open(io.BytesIO(thumbnail_png(rgb)))
    assert image.size == (112, 112) and image.mode == "RGB" and image.getpixel((5, 5)) == (200, 0, 0)
    sheet = Image.open(io.BytesIO(contact_sheet([grey[:, :, 0]] * 7, columns=3)))
    assert sheet.size == (3 * 96 + 2 * 4, 3 * 96 + 2 * 4)
    with pytest.raises(ValueError, match="uint8"):
        thumbnail_png(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        thumbnail_png(np.zeros((8, 8, 4), np.uint8))


def test_confusion_plot_decodes_and_small_confusions_are_visible_but_near_zero_is_blank():
    confusion = _confusion()[1]
    png = confusion_plot(confusion, CLASSES, "b")
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.size[0] > 400 and image.size[1] > 300
    rgba, _, _ = confusion_colours(confusion)
    white, grey = np.ones(3), rgba[0, 0, :3]
    assert np.allclose(rgba[0, 0, :3], rgba[3, 3, :3])  # the diagonal is one neutral colour, 80% or 97%
    assert np.ptp(grey) < 0.01  # neutral: no hue
    assert confusion[3, 0] < BLANK_BELOW and np.allclose(rgba[3, 0, :3], white)  # 0.2%: blank
    assert confusion[2, 1] == 0 and np.allclose(rgba[2, 1, :3], white)
    one, two, three = rgba[1, 3, :3], rgba[1, 2, :3], rgba[3, 2, :3]
    assert np.abs(one - white).max() > 0.15  # 1% stands out from blank
    assert np.abs(three - one).max() > 0.1  # 1% and 3% are told apart
    assert np.abs(rgba[1, 0, :3] - white).max() > np.abs(two - white).max()  # 17% louder than 2%
    assert three.sum() < one.sum() and two.sum() < one.sum()  # darker with more errors


def test_annotators_section_when_a_vendor_has_several():
    annotators = pd.DataFrame({
        "vendor": ["a", "b", "b"], "annotator": ["a-1", "b-day", "b-night"], "n_images": [400, 200, 180],
        "n_flagged": [3, 5, 36], "error_rate": [0.0123, 0.031, 0.187], "error_rate_low": [0.0041, 0.01, 0.14],
        "error_rate_high": [0.0245, 0.06, 0.24], "status": ["rated", "rated", "rated"]})
    markdown = _report(annotators=annotators).markdown
    section = _section(markdown, "Annotators within each vendor")
    assert "| b | b-night | 180 | 36 | 18.7% (14.0-24.0%) | rated |" in section
    assert "a-1" not in section  # a has one annotator: nothing to compare within it
    single = annotators[annotators["vendor"] == "a"]
    assert "Annotators within each vendor" not in _report(annotators=single).markdown


def test_report_files_from_real_curated_deliveries_and_quarantine(tmp_path):
    curated, quarantine, reports = tmp_path / "curated", tmp_path / "quarantine", tmp_path / "reports"
    issues = _issues()
    chosen = likely_errors(issues)
    for vendor in VENDORS:  # each delivery as ingestion stores it: rows.csv, images.npy, the quarantine CSV
        ids = issues.loc[issues["vendor"] == vendor, "image_id"]
        folder = curated / vendor / "batch-1"
        folder.mkdir(parents=True)
        np.save(folder / "images.npy", np.stack([np.full((8, 8, 3), i % 256, np.uint8) for i in range(len(ids))]))
        pd.DataFrame({"image_id": ids, "vendor": vendor, "batch": "batch-1", "image": ids.str.split("/", n=2).str[2],
                      "label": "cat", "row": range(2, len(ids) + 2), "sha256": ids}).to_csv(folder / "rows.csv",
                                                                                            index=False)
        (quarantine / vendor).mkdir(parents=True)
        (_quarantined() if vendor == "b" else _quarantined().iloc[:0]).to_csv(quarantine / vendor / "batch-1.csv",
                                                                              index=False)
    images = load_issue_images(curated, chosen)
    assert set(images) == set(chosen["image_id"]) and images["b/batch-1/images/0005.png"][0, 0, 0] == 5
    read = read_quarantine(quarantine)
    assert len(read) == 40 and set(read["reason"]) == {"image file not found", "unknown class", "empty label"}
    report = build_report(_scorecard(), _comparisons(), issues, _confusion(), VENDORS, CLASSES, {"head": "softmax"},
                          images=images, quarantined=read, quarantine_warn_share=0.05, n_boot=200)
    (reports / "thumbs").mkdir(parents=True)
    (reports / "thumbs" / "b-9.png").write_bytes(b"left by an earlier report")
    write_report(reports, report)
    assert (reports / "report.md").read_text() == report.markdown
    assert (reports / "report.html").read_text() == report.html
    assert Image.open(reports / "thumbs" / "b-1.png").mode == "RGB"
    assert not (reports / "thumbs" / "b-9.png").exists()
    assert "| b/batch-1 | 420 | 40 | 9.5% |" in report.markdown

    missing = chosen.assign(image_id=chosen["image_id"].where(chosen["vendor"] != "c", "c/batch-1/images/9999.png"))
    with pytest.raises(ValueError, match=r"c/batch-1/rows.csv: no row for image c/batch-1/images/9999.png"):
        load_issue_images(curated, missing)
    (quarantine / "a" / "broken.csv").write_text("vendor,batch,row\n")
    with pytest.raises(ValueError, match=r"broken.csv: quarantine file lacks column\(s\) reason"):
        read_quarantine(quarantine)


def test_write_section_still_replaces_only_its_marked_section(tmp_path):
    path = tmp_path / "BENCH.md"
    write_section(path, "bench", "first")
    write_section(path, "other", "kept")
    write_section(path, "bench", "second")
    text = path.read_text()
    assert "second" in text and "first" not in text and "kept" in text


def test_a_vendor_that_got_worse_is_named_in_the_summary_with_its_evidence_once():
    worse = ("got worse: its newest delivery batch-3 reads 14.8% against 4.4% for its earlier ones, +10.4 points "
             "(95% interval +7.1 to +13.1; Holm-adjusted p = 0.015 across the vendors tested)")
    card = _scorecard().assign(worsening=["", worse, ""], note=["", worse, "only 12 images delivered"])
    summary = _section(_report(card=card).markdown, "Summary")
    assert ("**b got worse**: its newest delivery batch-3 reads 14.8% against 4.4% for its earlier ones, +10.4 "
            "points (95% interval +7.1 to +13.1; Holm-adjusted p = 0.015 across the vendors tested). The section "
            "Over time plots each delivery.") in summary
    assert summary.count("batch-3 reads 14.8%") == 1  # not repeated as a warning to read
    assert "got worse" not in _section(_report().markdown, "Summary")
