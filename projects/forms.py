from __future__ import annotations

from django import forms

from .models import InstructionPair, Membership, Project


class ProjectForm(forms.Form):
    name = forms.CharField(max_length=120, help_text="For example “Support handbook assistant”.")
    description = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Optional: what the model should be good at.",
    )


class InviteForm(forms.Form):
    username = forms.CharField(max_length=150, help_text="The person must already have an account.")
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER)


class ProjectDeleteForm(forms.Form):
    """Deleting a project is confirmed by typing its name, so a stray click cannot do it."""

    name = forms.CharField(
        max_length=120, label="Project name", widget=forms.TextInput(attrs={"autocomplete": "off"})
    )

    def __init__(self, *args: object, project: Project, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.project = project
        self.fields["name"].help_text = f"Type “{project.name}” to confirm."

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if name != self.project.name:
            raise forms.ValidationError(
                f"That is not the project's name. Type “{self.project.name}” exactly to delete it."
            )
        return name


class PairForm(forms.ModelForm):
    class Meta:
        model = InstructionPair
        fields = ["instruction", "input", "response"]
        labels = {"input": "Context"}
        help_texts = {
            "instruction": "The question or task, as a user would write it.",
            "input": "Extra text the answer relies on, if any.",
            "response": "The answer you want the model to give.",
        }
        widgets = {
            "instruction": forms.Textarea(attrs={"rows": 3}),
            "input": forms.Textarea(attrs={"rows": 2}),
            "response": forms.Textarea(attrs={"rows": 5}),
        }


class PairImportForm(forms.Form):
    file = forms.FileField(
        help_text="JSONL or CSV with instruction, optional input/context, and response. "
        "Alpaca and chat (messages / ShareGPT) formats work too."
    )
