from __future__ import annotations

from django import forms

from .models import InstructionPair, Membership


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
