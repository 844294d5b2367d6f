"""The report's HTML page and its Markdown, built from one data model over a small hand-made run store: the
page's structure (title, summary, contents, captioned figures, marked tables, facts as tables), no Markdown
syntax in it, and the same numbers in both renderings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest

from mergelab.bench.report import build_report
from mergelab.bench.store import ResultStore
from mergelab.evaluation.results import ModelKind, ResultRow

TASKS = ("news", "spam")
META = {
    "config": {"seeds": 2, "shots": [5], "protocols": ["current", "knn", "aligned"], "transforms": ["orthogonal"],
               "select_on": "validation", "select_protocol": "current",
               "methods": [{"name": "ties", "label": None}, {"name": "task_arithmetic", "label": None}]},
    "chosen": {"task_arithmetic": {"scale": 0.5}},
    "selection": {"task_arithmetic": [{"params": {"scale": 0.3}, "score": 0.81},
                                      {"params": {"scale": 0.5}, "score": 0.84}]},
    "provenance": {t: {"source": f"{t} corpus", "seed": 0, "sizes": {"train": 100, "validation": 20, "test": 40},
                       "requested": {"train": 200, "validation": 20, "test": 40}} for t in TASKS},
    "fewshot_pool": {t: {"size": 30, "per_class": 10, "smallest_class": 10} for t in TASKS},
    "versions": {"mergelab": "0.1.0", "torch": "2.13.0"},
    "timings": {"data": 1.2, "total": 30.4},
    "learned": {'adamerging {"steps": 5}': {"method": "adamerging", "coefficients": [0.25, 0.75], "split": "test"}},
    "experts": {t: {"test_accuracy": 0.9, "probe_accuracy": 0.8, "majority_rate": 0.5, "losses": [1.0, 0.5, 0.3],
                    "head_shift": 0.2, "steps": 3} for t in TASKS},
}  # fmt: skip


def result(model: ModelKind, method: str, protocol: str, task: str, accuracy: float, *, seed: int = 0,
           shots: int = 0, transductive: bool = False, **extras: float) -> ResultRow:  # fmt: skip
    return ResultRow(model=model.value, method=method, params="{}", protocol=protocol, task=task, seed=seed,
                     shots=shots, accuracy=accuracy, transductive=transductive, extras=dict(extras))  # fmt: skip


def hand_rows() -> list[ResultRow]:
    """Experts above every merge; ties beats task_arithmetic under Current, KNN reverses them; adamerging is a
    transductive merge (its rows are set apart and never marked best, though it scores highest); the aligned
    map and its control are transductive; KNN of task_arithmetic shares no seed between its two tasks."""
    rows = []
    for i, task in enumerate(TASKS):
        rows += [
            result(ModelKind.FINETUNED, "individual", "current", task, 0.95 - i / 10),
            result(ModelKind.PRETRAINED, "pretrained", "current", task, 0.50 - i / 10),
            result(ModelKind.MERGED, "ties", "current", task, 0.80 - i / 10),
            result(ModelKind.MERGED, "task_arithmetic", "current", task, 0.70 - i / 10),
            result(ModelKind.MERGED, "adamerging", "current", task, 0.90 - i / 10, transductive=True),
            result(ModelKind.MERGED, "ties", "aligned:orthogonal", task, 0.85, transductive=True, chance_majority=0.5),
            result(ModelKind.MERGED, "ties", "aligned-control:orthogonal", task, 0.52, transductive=True,
                   chance_majority=0.5, chance_independent=0.5),
            result(ModelKind.MERGED, "task_arithmetic", "knn", task, 0.75 - i / 10, seed=i, shots=5),
        ]  # fmt: skip
        for seed in (0, 1):
            rows.append(result(ModelKind.MERGED, "ties", "knn", task, 0.60 + seed / 10 - i / 10, seed=seed, shots=5))
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    with ResultStore(folder / "results.sqlite") as store:
        store.add_rows([{**r.to_dict(), "key": f"k{i}"} for i, r in enumerate(hand_rows())])
        for key, value in META.items():
            store.set_meta(key, value)
    paths = build_report(folder)
    return {"html": paths["html"].read_text(), "markdown": paths["markdown"].read_text(), "folder": folder}


# ------------------------------------------------------------------------------------------- a tiny DOM


VOID = {"img", "meta", "br", "hr", "link", "input"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def all(self, tag: str, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and (cls is None or cls in child.classes()):
                    found.append(child)
                found += child.all(tag, cls)
        return found


class Dom(HTMLParser):
    def __init__(self, page: str) -> None:
        super().__init__()
        self.root = Node("root")
        self.stack = [self.root]
        self.feed(page)
        assert self.stack == [self.root], [n.tag for n in self.stack]  # every element closed

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, (self.stack[-1].tag, tag)
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def section(dom: Node, id_: str) -> Node:
    found = [s for s in dom.all("section") if s.attrs.get("id") == id_]
    assert len(found) == 1, id_
    return found[0]


def cells(table: Node) -> list[list[str]]:
    return [[td.text() for td in tr.all("td")] for tr in table.all("tr") if tr.all("td")]


# ------------------------------------------------------------------------------------------------ the page


def test_page_structure(run):
    dom = Dom(run["html"]).root
    assert dom.all("title")[0].text() == "mergelab benchmark report" == dom.all("h1")[0].text()
    ids = [s.attrs["id"] for s in dom.all("section")]
    assert len(ids) == len(set(ids)) and ids[0] == "summary"
    links = [a.attrs["href"] for a in dom.all("nav")[0].all("a")]
    assert links == [f"#{i}" for i in ids]  # the contents list every section, and each link resolves
    findings = section(dom, "summary").all("li")
    texts = {li.all("strong")[0].text(): li.text() for li in findings}
    assert "fine-tuned experts 90.0 (upper bound); pretrained encoder 45.0 (lower bound)" in texts["Bounds."]
    assert "score 65.0 (task_arithmetic) to 85.0 (adamerging †), 5.0 to 25.0 points below" in texts["Bounds."]
    knn = "-5.0 points on average over 2 merged methods (-15.0 for ties to +5.0 for task_arithmetic)"
    assert knn in texts["KNN vs Current."] and "higher than Current for 1 of 2" in texts["KNN vs Current."]
    ranking = "adamerging † ranks first under Current; task_arithmetic ranks first under KNN."
    assert ranking in texts["Ranking."] and "with Current's ranking: KNN -1.00" in texts["Ranking."]
    assert "Both experts beat" in texts["Experts."] and "1 of 1 shuffled-pairs controls" in texts["Aligned controls."]


def test_figures_have_captions_not_file_names(run):
    dom = Dom(run["html"]).root
    figures = dom.all("figure")
    assert len(figures) >= 3  # shots, aligned, expert losses
    for fig in figures:
        img, caption = fig.all("img")[0], fig.all("figcaption")[0].text()
        assert img.attrs["src"].startswith("data:image/png;base64,") and img.attrs["alt"]
        assert len(caption) > 60 and ".png" not in caption
    assert not [h for h in dom.all("h2") if ".png" in h.text()]
    assert (run["folder"] / "fig5_shots.png").exists() and "![Figure 5: accuracy against shots](fig5_shots.png)" in run[
        "markdown"
    ]


def test_tables_mark_the_best_value_and_set_transductive_rows_apart(run):
    dom = Dom(run["html"]).root
    main = section(dom, "table-2").all("table")[0]
    best = main.all("td", "best")
    assert best and all(td.all("strong") for td in best)
    lines = {tr.all("td")[0].text(): tr for tr in main.all("tr") if tr.all("td")}
    assert "adamerging †" in lines and "transductive" in lines["adamerging †"].classes()
    assert not lines["adamerging †"].all("td", "best")  # transductive rows do not compete
    assert [td.text() for td in lines["ties"].all("td", "best")] == ["80.0", "70.0", "75.0"]  # news, spam, Avg
    assert [td.text() for td in lines["Fine-tuned (individual)"].all("td", "best")] == []  # references neither
    assert "transductive" not in lines["ties"].classes()
    assert "task_arithmetic + KNN (5-shot)" in lines  # ‡: no seed shared by its two tasks
    knn = lines["task_arithmetic + KNN (5-shot)"].all("td")
    assert knn[-1].text() == "70.0 ‡" and "no seed is shared" in knn[-1].attrs["title"]
    assert "‡: the average of the per-task means" in dom.all("p", "legend")[0].text()


def test_facts_are_tables_and_no_markdown_leaks(run):
    dom = Dom(run["html"]).root
    facts = section(dom, "run-facts")
    assert len(facts.all("table")) == 4  # configuration, data, versions, timings
    data = cells(facts.all("table")[1])
    assert data[0] == ["news", "news corpus", "100 (of 200 asked)", "20", "40", "0",
                       "30 (10 per class asked, smallest class 10)"]  # fmt: skip
    for part in ("run-facts", "hyper-parameters", "learned"):
        assert not re.search(r"[{}\"]", section(dom, part).text()), part  # no raw JSON
    assert "scale=0.5" in section(dom, "hyper-parameters").text()
    assert cells(section(dom, "learned").all("table")[0])[0] == ["adamerging (steps=5)", "coefficients", "[0.25, 0.75]"]
    text = dom.text()
    for leak in ("**", "`", "|---", "](", "## "):
        assert leak not in text, leak
    assert "<p>|" not in run["html"]


def test_markdown_and_html_show_the_same_numbers(run):
    dom = Dom(run["html"]).root
    html_rows = cells(section(dom, "table-2").all("table")[0])
    block = run["markdown"].split("## Table 2")[1].split("\n## ")[0]
    md_rows = [[c.strip().replace("**", "") for c in line.strip("|").split(" | ")]
               for line in block.splitlines() if line.startswith("| ") and not line.startswith("|  |")]  # fmt: skip
    assert md_rows == html_rows and len(md_rows) == 7
    assert md_rows[0] == ["Fine-tuned (individual)", "95.0", "85.0", "90.0"]
    assert "| ties | **80.0** | **70.0** | **75.0** |" in run["markdown"]  # the best mark in Markdown: bold
    assert "| ties + KNN (5-shot) | 65.0 ± 5.0 | 55.0 ± 5.0 | 60.0 ± 5.0 |" in run["markdown"]
    for table in dom.all("table"):  # every HTML number is in the Markdown too
        for line in cells(table):
            for value in line:
                if re.fullmatch(r"[\d.]+( ± [\d.]+)?", value):
                    assert value in run["markdown"], value


def test_a_method_run_with_several_params_becomes_one_line_per_params():
    from mergelab.bench.report import RunResults, main_results_table
    from mergelab.bench.report.markdown import markdown_table

    rows = [r for r in hand_rows() if r.protocol == "current"]
    rows += [ResultRow(**{**r.to_dict(), "params": '{"scale": 1}', "accuracy": r.accuracy - 0.3})
             for r in rows if r.method == "ties"]  # fmt: skip
    results = RunResults.of(rows, methods=["ties", "task_arithmetic"])
    assert results.methods == ("ties {}", 'ties {"scale": 1}', "task_arithmetic", "adamerging")
    text = markdown_table(main_results_table(results))
    assert "| ties {} | **80.0** | **70.0** | **75.0** |" in text
    assert '| ties {"scale": 1} | 50.0 | 40.0 | 45.0 |' in text
