package lars.client;

/** The agent did not answer within timeout x (retries + 1), or cannot be reached. */
public class AgentUnavailableException extends LarsException {
    private static final long serialVersionUID = 1L;

    /** An error with this message. */
    public AgentUnavailableException(String message) {
        super(message);
    }
}
