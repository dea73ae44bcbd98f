package lars.client;

/** Root of every error the Lars client throws on purpose. Unchecked, so that callers catch what they handle and let the rest through. */
public class LarsException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    /** An error with this message. */
    public LarsException(String message) {
        super(message);
    }
}
