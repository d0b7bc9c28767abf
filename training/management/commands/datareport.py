from __future__ import annotations

from projects.models import DataReport, Project
from slmstudio.lib.cli import JsonCommand
from training.reports import report_compute, report_is_current


class Command(JsonCommand):
    help = (
        "Compute a project's dataset quality report now and print its numbers as JSON (with --cached: the "
        'stored report, if any). Keys: "version"; "documents" {count, failed, pending, chars (count/min/median/'
        "p90/max/mean), pages, near_empty_pages, mostly_empty [{id, name, empty, of}], garbled {ratio, "
        "documents [{id, name, ratio}]}, languages {code: documents}, passages, duplicates {groups, redundant, "
        'examples}}; "pairs" {count, train, eval, pending_review, rejected, question_words, answer_words, '
        "duplicates, duplicate_questions, near_duplicates, duplicate_examples, support {threshold, scored, "
        "unsupported, median, examples}, leakage {count, examples}, topics {by, topics [{topic, pairs, share}], "
        'without_topic, largest_share, balance}}; "privacy" {findings, unredacted}; "advice" [{level, code, '
        'text}]; "computed_at"; "seconds"; and "current" (whether it is newer than the last data change).'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug or id")
        parser.add_argument(
            "--cached", action="store_true", help="print the stored report instead of computing"
        )

    def handle(self, *args, project: str, cached: bool, **options) -> None:  # type: ignore[no-untyped-def]
        target = Project.objects.filter(slug=project).first()
        if target is None and project.isdigit():
            target = Project.objects.filter(pk=int(project)).first()
        if target is None:
            self.fail(f"No project {project!r}.")
        if cached:
            report = DataReport.objects.filter(project=target).first()
            if report is None:
                self.fail("This project has no report yet; run without --cached to compute it.")
        else:
            from projects.privacy import project_scan

            project_scan(project=target)  # findings current, as the task does
            report = report_compute(project=target)
        self.emit(report.data | {"current": report_is_current(project=target, report=report)})
