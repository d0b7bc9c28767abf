from django.db import migrations


def backfill(apps, schema_editor):
    """Versions built before quantization existed served the bundled Q4_1 GGUF: say so."""
    ModelVersion = apps.get_model("training", "ModelVersion")
    ModelVersion.objects.filter(quant_type="", gguf_path__iendswith="q4_1.gguf").update(quant_type="q4_1")


class Migration(migrations.Migration):
    dependencies = [("training", "0002_base_models_and_quantized_versions")]

    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
